//! Which dataset to train on, as one string a user types (`--dataset mnist:/data/mnist`).
//!
//! A spec is parsed once at the edge (command line, config file) and travels as a string in
//! `run.json` and over the network, so it implements `FromStr` and `Display` and the two
//! round-trip.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{DataError, Dataset};

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum DatasetSpec {
    /// `mnist:PATH`: a directory with `train-images-idx3-ubyte[.gz]` (and labels), or the file.
    Mnist(PathBuf),
    /// `fashion-mnist:PATH`: same layout as MNIST.
    FashionMnist(PathBuf),
    /// `cifar10:PATH`: a directory with `data_batch_{1..5}.bin[.gz|.xz]`, or one such file.
    Cifar10(PathBuf),
    /// `folder:PATH`: every PNG/JPEG/WebP under a directory.
    Folder(PathBuf),
    /// `tar:PATH`: the images of a tar file (`.tar`, `.tar.gz`), WebDataset style: a `.cls`
    /// member beside an image is its label.
    Tar(PathBuf),
    /// `lsun:PATH`: an LSUN category's LMDB directory (`bedroom_train_lmdb`), as the PyTorch
    /// example reads it.
    Lsun(PathBuf),
    /// `prepared:PATH`: a directory made by `dcgan prepare`.
    Prepared(PathBuf),
    /// `shapes` (also `builtin`, `builtin:shapes`): the procedural dataset; needs no file.
    #[default]
    Shapes,
    /// `fake`: random images, as the PyTorch example's `--dataset fake`; needs no file.
    Fake,
}

const KINDS: &str =
    "mnist:PATH, fashion-mnist:PATH, cifar10:PATH, folder:PATH, tar:PATH, lsun:PATH, prepared:PATH, shapes, fake";

impl DatasetSpec {
    /// The kind's canonical name, also used as [`Dataset::name`].
    pub fn kind(&self) -> &'static str {
        match self {
            DatasetSpec::Mnist(_) => "mnist",
            DatasetSpec::FashionMnist(_) => "fashion-mnist",
            DatasetSpec::Cifar10(_) => "cifar10",
            DatasetSpec::Folder(_) => "folder",
            DatasetSpec::Tar(_) => "tar",
            DatasetSpec::Lsun(_) => "lsun",
            DatasetSpec::Prepared(_) => "prepared",
            DatasetSpec::Shapes => "shapes",
            DatasetSpec::Fake => "fake",
        }
    }

    /// The path the spec points at (none for the built-in dataset).
    pub fn path(&self) -> Option<&Path> {
        match self {
            DatasetSpec::Mnist(p)
            | DatasetSpec::FashionMnist(p)
            | DatasetSpec::Cifar10(p)
            | DatasetSpec::Folder(p)
            | DatasetSpec::Tar(p)
            | DatasetSpec::Lsun(p)
            | DatasetSpec::Prepared(p) => Some(p),
            DatasetSpec::Shapes | DatasetSpec::Fake => None,
        }
    }

    /// The set drawn on demand this spec names, if it is one (they need no file).
    pub fn drawn(&self) -> Option<crate::Drawn> {
        match self {
            DatasetSpec::Shapes => Some(crate::Drawn::Shapes),
            DatasetSpec::Fake => Some(crate::Drawn::Fake),
            _ => None,
        }
    }

    /// Whether the samples come from files that `dcgan prepare` turns into shards (every kind
    /// but the built-in set, which is drawn on demand, and a set that is prepared already).
    pub fn is_preparable(&self) -> bool {
        !matches!(self, DatasetSpec::Shapes | DatasetSpec::Fake | DatasetSpec::Prepared(_))
    }

    /// Reads (or generates) the whole dataset into memory with every sample resized and
    /// centre-cropped to `image_size x image_size`, keeping only the first `limit` samples if
    /// given. Training reads samples through [`crate::SampleStore`] instead; this serves what
    /// needs a set at once (an FID classifier, nearest neighbours) and small sets.
    pub fn load(&self, image_size: usize, limit: Option<usize>) -> Result<Dataset, DataError> {
        if image_size == 0 {
            return Err(DataError::InvalidArgument {
                path: self.path().unwrap_or(Path::new(self.kind())).to_path_buf(),
                msg: "image size must be at least 1".into(),
            });
        }
        match self {
            DatasetSpec::Mnist(p) => {
                crate::idx::load::<f32>("mnist", p, &["mnist", "MNIST/raw"], image_size, limit).map(Dataset::from)
            }
            DatasetSpec::FashionMnist(p) => {
                crate::idx::load::<f32>("fashion-mnist", p, &["fashion-mnist", "FashionMNIST/raw"], image_size, limit)
                    .map(Dataset::from)
            }
            DatasetSpec::Cifar10(p) => crate::cifar::load::<f32>(p, image_size, limit).map(Dataset::from),
            DatasetSpec::Folder(p) => crate::folder::load::<f32>(p, image_size, limit).map(Dataset::from),
            DatasetSpec::Tar(_) | DatasetSpec::Lsun(_) => crate::prepared::load_stream(self, image_size, limit),
            DatasetSpec::Prepared(p) => {
                let set = crate::PreparedSet::open(p)?.with_limit(limit);
                crate::store::check_prepared_size(&set, image_size)?;
                set.head(None)
            }
            DatasetSpec::Shapes | DatasetSpec::Fake => {
                let set = self.drawn().expect("a drawn set");
                Ok(set.generate(set.len_for(limit), image_size))
            }
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |msg: String| DataError::InvalidSpec { spec: s.to_string(), msg };
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(p)),
            None => (s, None),
        };
        let kind = kind.trim().to_ascii_lowercase();
        let with_path = |make: fn(PathBuf) -> DatasetSpec| match path {
            Some(p) if !p.is_empty() => Ok(make(PathBuf::from(p))),
            _ => Err(bad(format!("'{kind}' needs a path: {kind}:PATH"))),
        };
        match kind.as_str() {
            "mnist" => with_path(DatasetSpec::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => with_path(DatasetSpec::FashionMnist),
            "cifar10" | "cifar-10" => with_path(DatasetSpec::Cifar10),
            "folder" => with_path(DatasetSpec::Folder),
            "tar" => with_path(DatasetSpec::Tar),
            "lsun" | "lmdb" => with_path(DatasetSpec::Lsun),
            "prepared" => with_path(DatasetSpec::Prepared),
            "fake" if path.is_none() => Ok(DatasetSpec::Fake),
            "fake" => Err(bad("'fake' takes no path: it draws random images".to_string())),
            "shapes" | "builtin" => match path {
                None => Ok(DatasetSpec::Shapes),
                Some("shapes") if kind == "builtin" => Ok(DatasetSpec::Shapes),
                Some(other) => {
                    Err(bad(format!("unknown built-in dataset '{other}' (the built-in dataset is 'shapes')")))
                }
            },
            "" => Err(bad(format!("empty dataset kind; expected one of {KINDS}"))),
            _ => Err(bad(format!("unknown dataset kind '{kind}'; expected one of {KINDS}"))),
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path() {
            Some(p) => write!(f, "{}:{}", self.kind(), p.display()),
            None => f.write_str(self.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_round_trips() {
        let cases = [
            ("mnist:/data/mnist", DatasetSpec::Mnist("/data/mnist".into())),
            ("fashion-mnist:rel/dir", DatasetSpec::FashionMnist("rel/dir".into())),
            ("cifar10:/d/cifar-10", DatasetSpec::Cifar10("/d/cifar-10".into())),
            ("folder:/x:y", DatasetSpec::Folder("/x:y".into())),
            ("tar:/d/faces.tar", DatasetSpec::Tar("/d/faces.tar".into())),
            ("lsun:/d/bedroom_train_lmdb", DatasetSpec::Lsun("/d/bedroom_train_lmdb".into())),
            ("prepared:/p/celeba64", DatasetSpec::Prepared("/p/celeba64".into())),
            ("shapes", DatasetSpec::Shapes),
            ("fake", DatasetSpec::Fake),
        ];
        for (text, spec) in cases {
            let parsed: DatasetSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), text);
            assert_eq!(parsed.to_string().parse::<DatasetSpec>().unwrap(), spec);
        }
        for alias in ["builtin", "builtin:shapes", "Shapes"] {
            assert_eq!(alias.parse::<DatasetSpec>().unwrap(), DatasetSpec::Shapes);
        }
        assert_eq!("cifar-10:/a".parse::<DatasetSpec>().unwrap().to_string(), "cifar10:/a");
        assert_eq!(DatasetSpec::default(), DatasetSpec::Shapes);
    }

    #[test]
    fn clear_errors() {
        let e = "imagenet:/x".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown dataset kind 'imagenet'"), "{e}");
        assert!(e.contains("mnist:PATH"), "{e}");
        let e = "mnist".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("needs a path"), "{e}");
        let e = "folder:".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("needs a path"), "{e}");
        let e = "builtin:faces".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown built-in dataset 'faces'"), "{e}");
        assert!("shapes:x".parse::<DatasetSpec>().is_err());
        assert!("".parse::<DatasetSpec>().is_err());
    }
}
