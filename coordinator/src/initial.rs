//! `--netG` / `--netD`: a fresh run that starts from existing networks, as the PyTorch
//! example's flags of the same names do.
//!
//! The coordinator builds the run's step-0 state itself (the networks every worker would build
//! from the run's seed, with the given files loaded over them, and fresh Adam state) and stores
//! it as the checkpoint of step 0. The workers then start from it through the path a resumed
//! run already takes (`load_checkpoint` at `Join`, the checkpoint download), so no new protocol
//! is needed, a restart before the first real checkpoint still starts from the given weights,
//! and a run without these flags is not touched at all. Every file is checked here, names and
//! shapes against this run's networks, before any worker starts.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kernels::checkpoint::TrainingState;
use kernels::{CheckpointFiles, Gan, ModelConfig, OptimConfig};
use safetensors::SafeTensors;

use crate::config::RunConfig;

/// Which network a file is for, with its flag for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Generator,
    Discriminator,
}

impl Which {
    fn flag(self) -> &'static str {
        match self {
            Which::Generator => "--netG",
            Which::Discriminator => "--netD",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Which::Generator => "generator",
            Which::Discriminator => "discriminator",
        }
    }
}

/// One `--netG`/`--netD` file, read as safetensors bytes (a `.pth` is converted on reading).
struct WeightsFile {
    which: Which,
    path: PathBuf,
    safetensors: Vec<u8>,
}

/// The files given with `--netG` and `--netD`, read before the data set loads so that a missing
/// or unreadable file costs nothing.
pub struct StartingWeights {
    files: Vec<WeightsFile>,
}

impl StartingWeights {
    /// Reads the files named; `None` when neither flag was given.
    pub fn read(net_g: Option<&Path>, net_d: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let mut files = Vec::new();
        for (which, path) in [(Which::Generator, net_g), (Which::Discriminator, net_d)] {
            let Some(path) = path else { continue };
            let safetensors = pyformats::pth::weights_as_safetensors(path)
                .with_context(|| format!("{} {}", which.flag(), path.display()))?;
            files.push(WeightsFile { which, path: path.to_path_buf(), safetensors });
        }
        Ok((!files.is_empty()).then_some(Self { files }))
    }

    /// The run's step-0 checkpoint: `Gan::new` exactly as each worker calls it, then the given
    /// networks loaded over their fresh ones. Refuses a file whose tensors do not fit this run's
    /// networks, naming the flag, the file, the tensor and both shapes.
    pub fn initial_checkpoint(&self, config: &RunConfig) -> anyhow::Result<CheckpointFiles> {
        let model = config.model();
        let optim = OptimConfig { lr: config.lr, beta1: config.beta1, ..Default::default() };
        let mut gan = Gan::new(model.clone(), optim, config.seed).context("cannot build the run's networks")?;
        for f in &self.files {
            let what = format!("{} {}", f.which.flag(), f.path.display());
            let fresh = match f.which {
                Which::Generator => kernels::checkpoint::network_to_safetensors(gan.generator_net(), &what)?,
                Which::Discriminator => kernels::checkpoint::network_to_safetensors(gan.discriminator_net(), &what)?,
            };
            // A file for other networks is a wrong --netG/--netD value: a usage error.
            check_fits(f, &fresh, &model)
                .map_err(|e| dcgan_process::exit::usage(format!("{what}: {}", dcgan_process::exit::message(&e))))?;
            match f.which {
                Which::Generator => gan.load_generator_state(&f.safetensors, &what)?,
                Which::Discriminator => gan.load_discriminator_state(&f.safetensors, &what)?,
            }
            tracing::info!(file = %f.path.display(), network = f.which.noun(), "starting from the given weights");
        }
        let config_json: serde_json::Value =
            serde_json::from_str(&config.to_json()).context("the run's configuration as JSON")?;
        let state = TrainingState { step: 0, epoch: 0, step_in_epoch: 0, seed: config.seed, config: config_json };
        Ok(gan.save(&state)?)
    }
}

/// Compares the file's tensor names and shapes with the fresh network's (`fresh`, its
/// safetensors bytes), so that the first difference is reported in the run's terms.
fn check_fits(f: &WeightsFile, fresh: &[u8], model: &ModelConfig) -> anyhow::Result<()> {
    let file = SafeTensors::deserialize(&f.safetensors).context("not a safetensors or PyTorch .pth file")?;
    let fresh = SafeTensors::deserialize(fresh).context("the run's own network")?;
    let noun = f.which.noun();
    let mut wanted = fresh.names();
    wanted.sort_by_key(|n| module_order(n));
    for name in wanted {
        let want = fresh.tensor(name)?;
        let Ok(got) = file.tensor(name) else {
            bail!("tensor {name} is missing: this run's {noun} needs it{}", hint(f, model));
        };
        let scalar_as_vector = want.shape().is_empty() && got.shape() == [1];
        if got.shape() != want.shape() && !scalar_as_vector {
            bail!(
                "tensor {name} has shape {:?}, this run's {noun} needs {:?}{}",
                got.shape(),
                want.shape(),
                hint(f, model)
            );
        }
    }
    for name in file.names() {
        if fresh.tensor(name).is_err() {
            bail!("tensor {name} is not in this run's {noun}{}", hint(f, model));
        }
    }
    Ok(())
}

/// `main.3.running_mean` sorts by its module number, so the first mismatch reported is the
/// first layer's.
fn module_order(name: &str) -> (usize, String) {
    let idx = name.strip_prefix("main.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
    (idx.unwrap_or(usize::MAX), name.to_string())
}

/// The flags that would make this run's network match the file's, when the file's shape can
/// be read: ` (--ngf 8?)`.
fn hint(f: &WeightsFile, model: &ModelConfig) -> String {
    let Some(theirs) = file_model(f) else { return String::new() };
    let mut flags = Vec::new();
    if theirs.image_size != model.image_size {
        flags.push(format!("--image-size {}", theirs.image_size));
    }
    match f.which {
        Which::Generator => {
            if theirs.nz != model.nz {
                flags.push(format!("--nz {}", theirs.nz));
            }
            if theirs.ngf != model.ngf {
                flags.push(format!("--ngf {}", theirs.ngf));
            }
        }
        Which::Discriminator => {
            if theirs.ndf != model.ndf {
                flags.push(format!("--ndf {}", theirs.ndf));
            }
        }
    }
    if theirs.nc != model.nc {
        flags.push(format!("a data set of {} channel(s), this one has {}", theirs.nc, model.nc));
    }
    if flags.is_empty() { String::new() } else { format!(" ({}?)", flags.join(" ")) }
}

/// The networks the file was saved from, read off its convolution weights.
fn file_model(f: &WeightsFile) -> Option<ModelConfig> {
    let name = f.path.display().to_string();
    match f.which {
        Which::Generator => kernels::checkpoint::infer_generator_config(&f.safetensors, &name).ok(),
        Which::Discriminator => {
            // D: main.0.weight is [ndf, nc, 4, 4]; one convolution per halving from the image
            // size down to 4x4, and the last one to 1x1.
            let st = SafeTensors::deserialize(&f.safetensors).ok()?;
            let convs =
                st.tensors().into_iter().filter(|(n, v)| n.ends_with(".weight") && v.shape().len() == 4).count();
            let first = st.tensor("main.0.weight").ok()?;
            let (ndf, nc) = (*first.shape().first()?, *first.shape().get(1)?);
            let image_size = 1usize.checked_shl(convs as u32 + 1)?;
            Some(ModelConfig { image_size, nc, nz: 0, ngf: 0, ndf })
        }
    }
}
