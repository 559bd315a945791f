//! `dcgan prepare --download` against a local HTTP mirror serving the real data files (from
//! `shared/data`) or damaged copies: verified files are kept and loadable, damaged ones are named
//! in the error and leave nothing behind, and a complete download is not fetched again.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dcgan_tool::download::{DownloadOptions, Downloadable, download};
use sha2::{Digest, Sha256};

const MNIST_NAMES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];
const CIFAR_BINS: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// A directory of `shared/data`; the real-file tests must not pass vacuously without it.
fn shared(sub: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(sub);
    assert!(
        dir.is_dir(),
        "{} is missing: the download tests serve the real data sets from shared/data (CI has it there)",
        dir.display()
    );
    dir
}

/// A one-connection-at-a-time-per-thread HTTP/1.1 server for fixed files, counting requests.
struct Mirror {
    base: String,
    requests: Arc<AtomicUsize>,
}

impl Mirror {
    fn serve(files: HashMap<String, Arc<Vec<u8>>>) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, count) = (files.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = respond(stream, &files, &count);
                });
            }
        });
        Mirror { base, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn respond(stream: TcpStream, files: &HashMap<String, Arc<Vec<u8>>>, count: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/');
    let mut out = std::io::BufWriter::new(stream);
    match files.get(path) {
        Some(body) => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            out.write_all(body)?;
        }
        None => write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
    }
    out.flush()
}

fn read(path: &Path) -> Arc<Vec<u8>> {
    Arc::new(std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn idx_files(set: &str) -> HashMap<String, Arc<Vec<u8>>> {
    let dir = shared(set);
    MNIST_NAMES.iter().map(|n| (n.to_string(), read(&dir.join(n)))).collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn opts<'a>(mirror: &'a Mirror, dest: &'a Path) -> DownloadOptions<'a> {
    DownloadOptions { base_url: Some(&mirror.base), dest, progress: false }
}

/// The image count in the header of a gzip'ed IDX file.
fn idx_count(path: &Path) -> u32 {
    let mut header = [0u8; 8];
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_exact(&mut header).unwrap();
    u32::from_be_bytes([header[4], header[5], header[6], header[7]])
}

fn check_idx_set(set: Downloadable, dir_name: &str, kind: &str) {
    let mirror = Mirror::serve(idx_files(dir_name));
    let dest = tempfile::tempdir().unwrap();
    let spec = download(set, &opts(&mirror, dest.path())).unwrap();
    let dir = dest.path().join(dir_name);
    assert_eq!(spec, format!("{kind}:{}", dir.display()));
    assert_eq!(mirror.requests(), 4);
    assert_eq!(names_in(&dir), {
        let mut n = MNIST_NAMES.to_vec();
        n.sort();
        n
    });
    assert_eq!(idx_count(&dir.join("train-images-idx3-ubyte.gz")), 60000);
    let loaded = spec.parse::<data::DatasetSpec>().unwrap().load(28, Some(100)).unwrap();
    assert_eq!((loaded.len, loaded.nc, loaded.image_size), (100, 1, 28));

    // Everything is there and verified: nothing is fetched again.
    assert_eq!(download(set, &opts(&mirror, dest.path())).unwrap(), spec);
    assert_eq!(mirror.requests(), 4);
}

#[test]
fn mnist_downloads_verifies_and_loads() {
    check_idx_set(Downloadable::Mnist, "mnist", "mnist");
}

#[test]
fn fashion_mnist_downloads_verifies_and_loads() {
    check_idx_set(Downloadable::FashionMnist, "fashion-mnist", "fashion-mnist");
}

#[test]
fn wrong_bytes_are_named_and_not_kept() {
    let mut files = idx_files("mnist");
    let bad_name = "train-labels-idx1-ubyte.gz";
    let mut bad = files[bad_name].as_ref().clone();
    bad[100] ^= 0x01;
    let bad_sha = sha256_hex(&bad);
    files.insert(bad_name.into(), Arc::new(bad));
    let mirror = Mirror::serve(files);
    let dest = tempfile::tempdir().unwrap();

    let err = format!("{:#}", download(Downloadable::Mnist, &opts(&mirror, dest.path())).unwrap_err());
    assert!(err.contains(bad_name), "{err}");
    assert!(err.contains(&format!("{}{bad_name}", mirror.base)), "{err}");
    assert!(err.contains("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"), "{err}");
    assert!(err.contains(&bad_sha), "{err}");
    // The file verified before it is kept; the bad one and its temporary file are gone.
    assert_eq!(names_in(&dest.path().join("mnist")), ["train-images-idx3-ubyte.gz"]);

    // A good mirror then only has to supply what is missing.
    let good = Mirror::serve(idx_files("mnist"));
    download(Downloadable::Mnist, &opts(&good, dest.path())).unwrap();
    assert_eq!(good.requests(), 3);
}

#[test]
fn http_errors_name_url_and_status() {
    let mirror = Mirror::serve(HashMap::new());
    let dest = tempfile::tempdir().unwrap();
    let err = format!("{:#}", download(Downloadable::FashionMnist, &opts(&mirror, dest.path())).unwrap_err());
    assert!(err.contains(&format!("{}train-images-idx3-ubyte.gz", mirror.base)), "{err}");
    assert!(err.contains("404"), "{err}");
    assert_eq!(mirror.requests(), 1, "a 404 is not retried");
    assert!(names_in(&dest.path().join("fashion-mnist")).is_empty());
}

/// An uncompressed CIFAR-10 batch (`CIFAR_BINS[index]`), decompressed once for all tests; xz
/// is the slow part of these tests, so each batch is only decompressed when a test needs it.
fn cifar_batch(index: usize) -> &'static [u8] {
    static BATCHES: [OnceLock<Vec<u8>>; 6] = [const { OnceLock::new() }; 6];
    BATCHES[index].get_or_init(|| {
        let path = shared("cifar-10").join(format!("{}.xz", CIFAR_BINS[index]));
        let mut out = Vec::with_capacity(30_730_000);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        xz2::read::XzDecoder::new(file).read_to_end(&mut out).unwrap();
        out
    })
}

/// Every member of the real data set, the batches decompressed in parallel.
fn cifar_members() -> Vec<(&'static str, &'static [u8])> {
    let batches: Vec<&'static [u8]> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..CIFAR_BINS.len()).map(|i| s.spawn(move || cifar_batch(i))).collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    static META: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    let meta = META.get_or_init(|| read(&shared("cifar-10").join("batches.meta.txt")));
    let mut members: Vec<(&str, &[u8])> = CIFAR_BINS.iter().copied().zip(batches).collect();
    members.push(("batches.meta.txt", meta.as_slice()));
    members
}

/// A `cifar-10-binary.tar.gz` laid out like the official one (plus its readme).
fn cifar_archive(members: &[(&str, &[u8])]) -> Arc<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, format!("cifar-10-batches-bin/{name}"), bytes).unwrap();
    };
    add("readme.html", b"<html>CIFAR-10</html>\n");
    for (name, bytes) in members {
        add(name, bytes);
    }
    Arc::new(tar.into_inner().unwrap().finish().unwrap())
}

fn serve_archive(archive: Arc<Vec<u8>>) -> Mirror {
    Mirror::serve(HashMap::from([("cifar-10-binary.tar.gz".to_string(), archive)]))
}

#[test]
fn cifar10_downloads_extracts_verifies_and_loads() {
    let mirror = serve_archive(cifar_archive(&cifar_members()));
    let dest = tempfile::tempdir().unwrap();
    let spec = download(Downloadable::Cifar10, &opts(&mirror, dest.path())).unwrap();
    let dir = dest.path().join("cifar-10-batches-bin");
    assert_eq!(spec, format!("cifar10:{}", dir.display()));
    assert_eq!(names_in(dest.path()), ["cifar-10-batches-bin"], "no temporary directory is left");
    let mut expected: Vec<&str> = CIFAR_BINS.to_vec();
    expected.push("batches.meta.txt");
    expected.sort();
    assert_eq!(names_in(&dir), expected, "only the data set's members are extracted");
    let loaded = spec.parse::<data::DatasetSpec>().unwrap().load(32, Some(100)).unwrap();
    assert_eq!((loaded.len, loaded.nc, loaded.image_size), (100, 3, 32));
    assert_eq!(mirror.requests(), 1);

    assert_eq!(download(Downloadable::Cifar10, &opts(&mirror, dest.path())).unwrap(), spec);
    assert_eq!(mirror.requests(), 1, "a complete copy is not fetched again");
}

#[test]
fn cifar10_damaged_member_is_named_and_nothing_kept() {
    let mut damaged = cifar_batch(1).to_vec();
    damaged[12_345] ^= 0x80;
    let members = [(CIFAR_BINS[0], cifar_batch(0)), (CIFAR_BINS[1], damaged.as_slice())];
    let mirror = serve_archive(cifar_archive(&members));
    let dest = tempfile::tempdir().unwrap();
    let err = format!("{:#}", download(Downloadable::Cifar10, &opts(&mirror, dest.path())).unwrap_err());
    assert!(err.contains("cifar-10-batches-bin/data_batch_2.bin"), "{err}");
    assert!(err.contains(&format!("{}cifar-10-binary.tar.gz", mirror.base)), "{err}");
    assert!(err.contains("a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"), "{err}");
    assert!(err.contains(&sha256_hex(&damaged)), "{err}");
    assert!(names_in(dest.path()).is_empty(), "the verified data_batch_1.bin is not kept alone either");
}

#[test]
fn cifar10_missing_member_is_an_error() {
    let meta = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
    let mirror = serve_archive(cifar_archive(&[("batches.meta.txt", meta)]));
    let dest = tempfile::tempdir().unwrap();
    let err = format!("{:#}", download(Downloadable::Cifar10, &opts(&mirror, dest.path())).unwrap_err());
    assert!(err.contains("cifar-10-batches-bin/data_batch_1.bin"), "{err}");
    assert!(err.contains("cifar-10-batches-bin/test_batch.bin"), "{err}");
    assert!(names_in(dest.path()).is_empty());
}
