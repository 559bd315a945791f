//! `dcgan prepare --download`: fetches MNIST, Fashion-MNIST or CIFAR-10 from their usual public
//! locations (or a mirror) and checks every byte against sha256 sums pinned here, so that a run
//! never trains on a truncated download or on whatever a mirror chose to serve.
//!
//! Nothing unverified ever carries a final name: each file is written under a temporary name in
//! its destination directory, synced, and renamed only once its checksum matched (CIFAR-10's
//! members are extracted into a temporary directory and moved once all of them matched). A failed
//! or interrupted download therefore never looks like a complete data set to the loaders.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::{Component, Path};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use data::DatasetSpec;
use flate2::read::GzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The data sets `dcgan prepare --download` knows how to fetch.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downloadable {
    Mnist,
    FashionMnist,
    Cifar10,
}

/// Where and how [`download`] fetches.
#[derive(Clone, Copy, Debug)]
pub struct DownloadOptions<'a> {
    /// Replaces each file's usual base URL (a mirror); the file name is appended.
    pub base_url: Option<&'a str>,
    /// Directory the data set goes into (created); files already there with the right sha256 are kept.
    pub dest: &'a Path,
    /// Draw a progress bar (bytes, bytes/s) on stderr.
    pub progress: bool,
}

/// A file whose bytes are known in advance.
struct Pinned {
    name: &'static str,
    /// Also bounds how much of a response is written to disk, so a wrong URL that streams
    /// something large cannot fill the disk before the checksum rejects it.
    size: u64,
    sha256: &'static str,
}

/// torchvision's mirror: yann.lecun.com, the original home, now often refuses downloads.
const MNIST_BASE: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
const FASHION_BASE: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
const CIFAR_BASE: &str = "https://www.cs.toronto.edu/~kriz/";
const CIFAR_ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// The directory the official archive unpacks to; `data`'s CIFAR-10 loader reads it as is.
const CIFAR_DIR: &str = "cifar-10-batches-bin";

/// The original gzip files (MNIST: yann.lecun.com, mirrored unchanged by torchvision), sha256 of
/// the copies in `shared/data/mnist/`, which are byte-identical to the originals (their md5s
/// equal the published ones, see `shared/data/README.md`).
const MNIST_FILES: [Pinned; 4] = [
    Pinned {
        name: "train-images-idx3-ubyte.gz",
        size: 9_912_422,
        sha256: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    },
    Pinned {
        name: "train-labels-idx1-ubyte.gz",
        size: 28_881,
        sha256: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    },
    Pinned {
        name: "t10k-images-idx3-ubyte.gz",
        size: 1_648_877,
        sha256: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    },
    Pinned {
        name: "t10k-labels-idx1-ubyte.gz",
        size: 4_542,
        sha256: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
];

/// Zalando's original gzip files; sha256 of the byte-identical copies in
/// `shared/data/fashion-mnist/` (md5s equal those in the fashion-mnist README).
const FASHION_FILES: [Pinned; 4] = [
    Pinned {
        name: "train-images-idx3-ubyte.gz",
        size: 26_421_880,
        sha256: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    },
    Pinned {
        name: "train-labels-idx1-ubyte.gz",
        size: 29_515,
        sha256: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    },
    Pinned {
        name: "t10k-images-idx3-ubyte.gz",
        size: 4_422_102,
        sha256: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    },
    Pinned {
        name: "t10k-labels-idx1-ubyte.gz",
        size: 5_148,
        sha256: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
];

/// CIFAR-10's batches as extracted from `cifar-10-binary.tar.gz`. The archive's own sha256 was
/// not available to check offline (only its md5 is published), so the members are pinned
/// instead, and checked as they are extracted: sha256 of the uncompressed `shared/data/cifar-10/`
/// batches, whose md5s equal the official per-file md5s of the extracted archive.
const CIFAR_BATCHES: [Pinned; 6] = [
    Pinned {
        name: "data_batch_1.bin",
        size: 30_730_000,
        sha256: "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    },
    Pinned {
        name: "data_batch_2.bin",
        size: 30_730_000,
        sha256: "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    },
    Pinned {
        name: "data_batch_3.bin",
        size: 30_730_000,
        sha256: "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    },
    Pinned {
        name: "data_batch_4.bin",
        size: 30_730_000,
        sha256: "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    },
    Pinned {
        name: "data_batch_5.bin",
        size: 30_730_000,
        sha256: "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    },
    Pinned {
        name: "test_batch.bin",
        size: 30_730_000,
        sha256: "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    },
];

/// The archive's class-name list. No checksum of the official file is published (and the shared
/// copy is a rewrite), so it is checked by content instead: the ten names, in label order.
const CIFAR_META: &str = "batches.meta.txt";
const CIFAR_META_MAX: u64 = 4096;
const CIFAR_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A stall of this long mid-body fails the download; there is no total limit, since CIFAR-10's
/// 170 MB may legitimately take long on a slow link.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of a request that failed before any response (connection refused or reset, DNS, a
/// timeout, a 5xx): those are often transient; anything else will fail the same way again.
const RETRIES: u32 = 2;

/// Fetches the data set's public files, checks every sha256, and returns the dataset spec string
/// that reads them (e.g. "mnist:/dest/mnist", "cifar10:/dest/cifar-10-batches-bin"). The path in
/// the spec is absolute so the spec works from any directory (it is stored in `run.json`).
pub fn download(set: Downloadable, opts: &DownloadOptions) -> Result<String> {
    fs::create_dir_all(opts.dest)
        .with_context(|| format!("creating the download directory {}", opts.dest.display()))?;
    let dest = std::path::absolute(opts.dest)
        .with_context(|| format!("making the download directory {} absolute", opts.dest.display()))?;
    let spec = match set {
        Downloadable::Mnist => {
            let dir = dest.join("mnist");
            fetch_files(&dir, opts.base_url.unwrap_or(MNIST_BASE), &MNIST_FILES, opts.progress)?;
            DatasetSpec::Mnist(dir)
        }
        Downloadable::FashionMnist => {
            let dir = dest.join("fashion-mnist");
            fetch_files(&dir, opts.base_url.unwrap_or(FASHION_BASE), &FASHION_FILES, opts.progress)?;
            DatasetSpec::FashionMnist(dir)
        }
        Downloadable::Cifar10 => {
            fetch_cifar(&dest, opts.base_url.unwrap_or(CIFAR_BASE), opts.progress)?;
            DatasetSpec::Cifar10(dest.join(CIFAR_DIR))
        }
    };
    Ok(spec.to_string())
}

/// Downloads each of `files` from `base` into `dir` unless a verified copy is already there.
fn fetch_files(dir: &Path, base: &str, files: &[Pinned], progress: bool) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut agent = None;
    for file in files {
        let target = dir.join(file.name);
        if has_pinned_bytes(&target, file)? {
            continue;
        }
        let agent = agent.get_or_insert_with(|| new_agent(base));
        let url = join_url(base, file.name);
        // The announced length is not checked: a mirror's error page served as 200 is best
        // reported by the checksum, and the copy stops one byte past the pinned size anyway.
        let (_, body) = get(agent, &url)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", file.name))
            .suffix(".part")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        let bar = progress_bar(progress, Some(file.size), file.name);
        let tmp_path = tmp.path().to_path_buf();
        let copied = copy_hashed(&mut bar.wrap_read(body), tmp.as_file_mut(), file.size, &url, &tmp_path);
        bar.finish_and_clear();
        let (n, actual) = copied?;
        ensure!(n <= file.size, "{url} sent more than the {} bytes of {}; not keeping it", file.size, file.name);
        check_sha256(file.name, &url, file.sha256, &actual)?;
        tmp.as_file().sync_all().with_context(|| format!("syncing {}", tmp.path().display()))?;
        tmp.persist(&target).map_err(|e| e.error).with_context(|| format!("renaming into {}", target.display()))?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Downloads and unpacks CIFAR-10 into `dest/cifar-10-batches-bin` unless a complete verified
/// copy is already there.
fn fetch_cifar(dest: &Path, base: &str, progress: bool) -> Result<()> {
    let target = dest.join(CIFAR_DIR);
    if cifar_complete(&target)? {
        return Ok(());
    }
    let url = join_url(base, CIFAR_ARCHIVE);
    let (len, body) = get(&new_agent(base), &url)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{CIFAR_DIR}."))
        .suffix(".part")
        .tempdir_in(dest)
        .with_context(|| format!("creating a temporary directory in {}", dest.display()))?;
    let bar = progress_bar(progress, len, CIFAR_ARCHIVE);
    let extracted = extract_cifar(bar.wrap_read(body), &url, tmp.path());
    bar.finish_and_clear();
    extracted?;
    sync_dir(tmp.path())?;
    if target.exists() {
        // An incomplete or damaged earlier copy: replace its members one by one (each rename is
        // atomic, and each new member is verified), keeping anything else the user put there.
        for name in CIFAR_BATCHES.iter().map(|b| b.name).chain([CIFAR_META]) {
            let to = target.join(name);
            fs::rename(tmp.path().join(name), &to).with_context(|| format!("renaming into {}", to.display()))?;
        }
        sync_dir(&target)?;
    } else {
        let from = tmp.keep();
        if let Err(e) = fs::rename(&from, &target) {
            let _ = fs::remove_dir_all(&from);
            return Err(anyhow!(e).context(format!("renaming {} to {}", from.display(), target.display())));
        }
    }
    sync_dir(dest)
}

/// Streams the archive, writing the wanted members into `into` and checking each as it is
/// written; other members (the archive's `readme.html`) are skipped.
fn extract_cifar(body: impl Read, url: &str, into: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::with_capacity(1 << 16, body)));
    let mut seen = [false; CIFAR_BATCHES.len() + 1];
    let entries = archive.entries().with_context(|| format!("reading the tar.gz archive {url}"))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("reading the tar.gz archive {url}"))?;
        let path = entry.path().with_context(|| format!("a member name in {url}"))?.into_owned();
        let Some(name) = cifar_member(&path) else { continue };
        let index = CIFAR_BATCHES.iter().position(|b| b.name == name).unwrap_or(CIFAR_BATCHES.len());
        let shown = format!("{CIFAR_DIR}/{name}");
        ensure!(entry.header().entry_type().is_file(), "member {shown} of {url} is not a regular file");
        ensure!(!seen[index], "member {shown} appears twice in {url}");
        let size = entry.header().size().with_context(|| format!("the size of member {shown} in {url}"))?;
        let out_path = into.join(name);
        let mut out = File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
        let what = format!("member {shown} of {url}");
        match CIFAR_BATCHES.get(index) {
            Some(batch) => {
                ensure!(size == batch.size, "{what} has {size} bytes, expected {}", batch.size);
                let (_, actual) = copy_hashed(&mut entry, &mut out, batch.size, &what, &out_path)?;
                check_sha256(&shown, url, batch.sha256, &actual)?;
            }
            None => {
                ensure!(size <= CIFAR_META_MAX, "{what} has {size} bytes, expected at most {CIFAR_META_MAX}");
                let mut text = Vec::new();
                entry.read_to_end(&mut text).with_context(|| format!("reading {what}"))?;
                check_class_names(&text).with_context(|| format!("{what} is not CIFAR-10's class list"))?;
                out.write_all(&text).with_context(|| format!("writing {}", out_path.display()))?;
            }
        }
        out.sync_all().with_context(|| format!("syncing {}", out_path.display()))?;
        seen[index] = true;
    }
    let names = CIFAR_BATCHES.iter().map(|b| b.name).chain([CIFAR_META]);
    let missing: Vec<String> = names.zip(seen).filter(|(_, s)| !s).map(|(n, _)| format!("{CIFAR_DIR}/{n}")).collect();
    ensure!(missing.is_empty(), "{url} lacks the member(s) {}", missing.join(", "));
    Ok(())
}

/// The file name of an archive member the data set needs (`cifar-10-batches-bin/NAME`).
fn cifar_member(path: &Path) -> Option<&str> {
    let mut parts = path.components().filter(|c| !matches!(c, Component::CurDir));
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Component::Normal(dir)), Some(Component::Normal(name)), None) if dir == CIFAR_DIR => {
            let name = name.to_str()?;
            (name == CIFAR_META || CIFAR_BATCHES.iter().any(|b| b.name == name)).then_some(name)
        }
        _ => None,
    }
}

/// Whether `dir` already holds every CIFAR-10 member with the right contents.
fn cifar_complete(dir: &Path) -> Result<bool> {
    for batch in &CIFAR_BATCHES {
        if !has_pinned_bytes(&dir.join(batch.name), batch)? {
            return Ok(false);
        }
    }
    let meta = dir.join(CIFAR_META);
    match fs::read(&meta) {
        Ok(text) => Ok(check_class_names(&text).is_ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow!(e).context(format!("reading {}", meta.display()))),
    }
}

fn check_class_names(text: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(text).context("not UTF-8")?;
    let names: Vec<&str> = text.split_whitespace().collect();
    ensure!(names == CIFAR_CLASSES, "expected the names {} in that order, found {names:?}", CIFAR_CLASSES.join(" "));
    Ok(())
}

/// Whether `path` exists with exactly the pinned bytes (a wrong or partial copy is replaced).
fn has_pinned_bytes(path: &Path, file: &Pinned) -> Result<bool> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(anyhow!(e).context(format!("reading the metadata of {}", path.display()))),
    };
    if !meta.is_file() || meta.len() != file.size {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    io::copy(&mut f, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()) == file.sha256)
}

/// Copies at most `limit + 1` bytes (one more than allowed shows that the source is too long)
/// from `src` to `dst`, returning the byte count and the sha256 of what was copied. `what` names
/// the source and `dst_path` the destination in errors.
fn copy_hashed(
    src: &mut impl Read,
    dst: &mut impl Write,
    limit: u64,
    what: &str,
    dst_path: &Path,
) -> Result<(u64, String)> {
    let mut src = src.take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!(e).context(format!("reading {what}"))),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).with_context(|| format!("writing {}", dst_path.display()))?;
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

fn check_sha256(name: &str, url: &str, expected: &str, actual: &str) -> Result<()> {
    ensure!(
        actual == expected,
        "sha256 mismatch for {name} downloaded from {url}: expected {expected}, got {actual}; nothing was kept"
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `base` + `name`, with exactly one slash between them.
fn join_url(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

/// An agent with timeouts; a mirror on this machine is reached directly even when the
/// environment names a proxy (which would not know about it).
fn new_agent(base: &str) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .user_agent(concat!("dcgan/", env!("CARGO_PKG_VERSION")));
    if is_loopback(base) {
        config = config.proxy(None);
    }
    config.build().new_agent()
}

fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else { return false };
    let Some(host) = uri.host() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// GETs `url` (redirects followed) and returns the announced length and the body, retrying
/// [`RETRIES`] times on errors that are likely transient.
fn get(agent: &ureq::Agent, url: &str) -> Result<(Option<u64>, ureq::BodyReader<'static>)> {
    let mut attempt = 0;
    loop {
        let err = match agent.get(url).call() {
            Ok(response) => {
                let body = response.into_body();
                return Ok((body.content_length(), body.into_reader()));
            }
            Err(e) => e,
        };
        let transient = match &err {
            ureq::Error::StatusCode(code) => *code >= 500,
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed => true,
            _ => false,
        };
        if transient && attempt < RETRIES {
            attempt += 1;
            std::thread::sleep(Duration::from_secs(u64::from(attempt)));
            continue;
        }
        let tries = if attempt > 0 { format!(" (after {} attempts)", attempt + 1) } else { String::new() };
        if let ureq::Error::StatusCode(code) = err {
            let reason = ureq::http::StatusCode::from_u16(code).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
            bail!("GET {url}: HTTP status {code} {reason}{tries}");
        }
        return Err(anyhow!(err).context(format!("GET {url} failed{tries}")));
    }
}

/// A byte progress bar on stderr, or a hidden one.
fn progress_bar(show: bool, len: Option<u64>, name: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = match len {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        None => "{msg} {spinner} {bytes} {bytes_per_sec}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(name.to_string());
    bar
}

/// Makes a rename into `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing the directory {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn value_names_are_the_documented_ones() {
        let names: Vec<String> = Downloadable::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        assert_eq!(names, ["mnist", "fashion-mnist", "cifar10"]);
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://m/x/", "a.gz"), "http://m/x/a.gz");
        assert_eq!(join_url("http://m/x", "a.gz"), "http://m/x/a.gz");
        assert_eq!(join_url(MNIST_BASE, "t.gz"), "https://ossci-datasets.s3.amazonaws.com/mnist/t.gz");
    }

    #[test]
    fn loopback_mirrors_are_recognised() {
        assert!(is_loopback("http://127.0.0.1:8080/mnist/"));
        assert!(is_loopback("http://localhost/"));
        assert!(is_loopback("http://[::1]:9/"));
        assert!(!is_loopback(MNIST_BASE));
        assert!(!is_loopback("not a url"));
    }

    #[test]
    fn only_needed_members_are_extracted() {
        assert_eq!(cifar_member(Path::new("cifar-10-batches-bin/data_batch_1.bin")), Some("data_batch_1.bin"));
        assert_eq!(cifar_member(Path::new("./cifar-10-batches-bin/batches.meta.txt")), Some("batches.meta.txt"));
        assert_eq!(cifar_member(Path::new("cifar-10-batches-bin/readme.html")), None);
        assert_eq!(cifar_member(Path::new("data_batch_1.bin")), None);
        assert_eq!(cifar_member(Path::new("x/cifar-10-batches-bin/data_batch_1.bin")), None);
        assert_eq!(cifar_member(Path::new("cifar-10-batches-bin/../data_batch_1.bin")), None);
    }

    #[test]
    fn class_list_is_checked_by_content() {
        assert!(check_class_names(b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n").is_ok());
        assert!(check_class_names(b"airplane\r\nautomobile bird cat deer dog frog horse ship truck").is_ok());
        assert!(check_class_names(b"apple\naquarium_fish\n").is_err());
        assert!(check_class_names(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn pinned_sums_are_lowercase_sha256() {
        for f in MNIST_FILES.iter().chain(&FASHION_FILES).chain(&CIFAR_BATCHES) {
            assert_eq!(f.sha256.len(), 64, "{}", f.name);
            assert!(f.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{}", f.name);
        }
    }
}
