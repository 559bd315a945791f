//! The shared libraries the CUDA backend loads at run time, and what to tell the user when one
//! is missing. cudarc (with dynamic loading) panics when it cannot load a library, so every
//! entry point of the backend asks [`Library::require`] first and answers with an error instead.

use std::path::{Path, PathBuf};

use crate::KernelError;

/// One library that cudarc loads by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Library {
    /// What to call it in a message.
    pub what: &'static str,
    /// cudarc's name for it: `lib{stem}.so`, `lib{stem}.so.12`, ...
    pub stem: &'static str,
    /// How to install it.
    pub install: &'static str,
}

pub const DRIVER: Library = Library {
    what: "the NVIDIA driver's CUDA library",
    stem: "cuda",
    install: "install the NVIDIA driver (`nvidia-smi` must list the GPU; in a container, run it with the NVIDIA \
              container runtime)",
};

pub const NVRTC: Library = Library {
    what: "NVRTC (the CUDA runtime compiler)",
    stem: "nvrtc",
    install: "install it with `pip install nvidia-cuda-nvrtc` (CUDA 13; `nvidia-cuda-nvrtc-cu12` for CUDA 12) or \
              the CUDA toolkit's cuda-nvrtc package",
};

pub const CUBLAS: Library = Library {
    what: "cuBLAS",
    stem: "cublas",
    install: "install it with `pip install nvidia-cublas` (CUDA 13; `nvidia-cublas-cu12` for CUDA 12) or the CUDA \
              toolkit's libcublas package",
};

pub const NCCL: Library = Library {
    what: "NCCL",
    stem: "nccl",
    install: "install it with `pip install nvidia-nccl-cu13` (or `nvidia-nccl-cu12`) or the libnccl2 package",
};

/// Where links made by the helper scripts (and suggested in messages) live.
const LINK_DIR_HINT: &str = "$HOME/.local/lib/dcgan-cuda";

impl Library {
    /// Whether cudarc's loader finds the library (it `dlopen`s each of its candidate names).
    pub fn loadable(&self) -> bool {
        // SAFETY: loading a library runs its initialisers; these are NVIDIA's own libraries,
        // which cudarc would load the same way on first use.
        unsafe {
            match self.stem {
                "cuda" => cudarc::driver::sys::is_culib_present(),
                "nvrtc" => cudarc::nvrtc::sys::is_culib_present(),
                "cublas" => cudarc::cublas::sys::is_culib_present(),
                "nccl" => cudarc::nccl::sys::is_culib_present(),
                _ => false,
            }
        }
    }

    /// The file names cudarc tries, in its order.
    pub fn candidate_names(&self) -> Vec<String> {
        cudarc::get_lib_name_candidates(self.stem)
    }

    /// Files on this machine that look like this library (`lib{stem}.so` or `lib{stem}.so.*`),
    /// in [`search_dirs`] order.
    pub fn find(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for dir in search_dirs() {
            for path in library_files(&dir, self.stem) {
                if !found.contains(&path) {
                    found.push(path);
                }
            }
        }
        found
    }

    /// Ok (with the file the search found, if any) when cudarc can load the library; otherwise
    /// an error that says what was found where and exactly what to do about it.
    pub fn locate(&self) -> Result<Option<PathBuf>, KernelError> {
        let found = self.find();
        diagnose(self, self.loadable(), &found, &self.candidate_names())
    }

    /// [`Library::locate`] without the path.
    pub fn require(&self) -> Result<(), KernelError> {
        self.locate().map(|_| ())
    }
}

/// NCCL's location, or why it cannot be loaded. cudarc looks for `libnccl.so`, while NCCL's
/// runtime packages (pip's nvidia-nccl-cu13/-cu12, Debian's libnccl2) ship only `libnccl.so.2`, so a
/// machine with NCCL installed commonly needs one link: the error says which.
pub fn find_nccl() -> Result<Option<PathBuf>, KernelError> {
    NCCL.locate()
}

/// The decision behind [`Library::locate`], apart from the file system so it can be tested.
fn diagnose(
    lib: &Library,
    loadable: bool,
    found: &[PathBuf],
    candidates: &[String],
) -> Result<Option<PathBuf>, KernelError> {
    let accepted =
        |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| candidates.iter().any(|c| c == n));
    if loadable {
        return Ok(found.iter().find(|p| accepted(p)).or(found.first()).cloned());
    }
    let way_out = "or run on the CPU with `--device cpu`";
    let name = format!("lib{}.so", lib.stem);
    let msg = if let Some(path) = found.iter().find(|p| accepted(p)) {
        let dir = path.parent().unwrap_or(Path::new("."));
        format!(
            "{} cannot be loaded: {} exists but the dynamic loader does not search {}; run with \
             `export LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH`, {way_out}",
            lib.what,
            path.display(),
            dir.display(),
            dir.display()
        )
    } else if let Some(path) = found.first() {
        format!(
            "{} cannot be loaded: found {}, but cudarc only loads the names {:?}; create a link with \
             `mkdir -p {LINK_DIR_HINT} && ln -sf {} {LINK_DIR_HINT}/{name}` and run with \
             `export LD_LIBRARY_PATH={LINK_DIR_HINT}:$LD_LIBRARY_PATH` (scripts/gpu-check.sh does both), {way_out}",
            lib.what,
            path.display(),
            short_candidates(lib.stem, candidates),
            path.display(),
        )
    } else {
        format!(
            "{} ({name}) is not installed or not on the library path (searched LD_LIBRARY_PATH, the system \
             library directories, CUDA_HOME and pip's nvidia packages): {}, {way_out}",
            lib.what, lib.install
        )
    };
    Err(KernelError::DeviceUnavailable(msg))
}

/// cudarc's candidate list in its Linux spellings (`libX.so`, `libX.so.N`), without repeats.
fn short_candidates<'a>(stem: &str, candidates: &'a [String]) -> Vec<&'a str> {
    let prefix = format!("lib{stem}.so");
    let mut names: Vec<&str> = Vec::new();
    for c in candidates.iter().filter(|c| c.starts_with(&prefix)) {
        if !names.contains(&c.as_str()) {
            names.push(c);
        }
    }
    names
}

/// Directories worth searching for NVIDIA's libraries, most specific first: LD_LIBRARY_PATH,
/// CUDA_HOME / CUDA_PATH, the usual CUDA and container mounts, the loader's configured and
/// default directories, then `site-packages/nvidia/*/lib` of pip's CUDA wheels.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    for d in ["/usr/local/cuda/lib64", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.extend(ld_so_conf_dirs());
    for d in ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib", "/lib"] {
        dirs.push(PathBuf::from(d));
    }
    for site in site_packages_dirs() {
        let nvidia = site.join("nvidia");
        for sub in sorted_entries(&nvidia) {
            let lib = sub.join("lib");
            if lib.is_dir() {
                dirs.push(lib);
            }
        }
    }
    let mut unique = Vec::with_capacity(dirs.len());
    for d in dirs {
        if !unique.contains(&d) {
            unique.push(d);
        }
    }
    unique
}

/// The directories listed in /etc/ld.so.conf.d/*.conf (one absolute path per line).
fn ld_so_conf_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let confs =
        sorted_entries(Path::new("/etc/ld.so.conf.d")).into_iter().filter(|p| p.extension() == Some("conf".as_ref()));
    for conf in confs {
        if let Ok(text) = std::fs::read_to_string(&conf) {
            dirs.extend(text.lines().map(str::trim).filter(|l| l.starts_with('/')).map(PathBuf::from));
        }
    }
    dirs
}

/// Python package directories where pip puts NVIDIA's wheels: the active virtualenv or conda
/// environment, the user's, and the system's.
fn site_packages_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            prefixes.push(PathBuf::from(p));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    for p in ["/usr/local", "/usr", "/opt/conda"] {
        prefixes.push(PathBuf::from(p));
    }
    let mut dirs = Vec::new();
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            for py in sorted_entries(&prefix.join(lib)) {
                let is_python = py.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3"));
                if is_python {
                    dirs.push(py.join("site-packages"));
                    dirs.push(py.join("dist-packages"));
                }
            }
        }
    }
    dirs.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    dirs
}

/// `lib{stem}.so` and `lib{stem}.so.*` in `dir`, unversioned first.
fn library_files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let exact = format!("lib{stem}.so");
    let versioned = format!("lib{stem}.so.");
    let mut files: Vec<PathBuf> = sorted_entries(dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n == exact || n.starts_with(&versioned)))
        .collect();
    files.sort_by_key(|p| p.file_name().is_some_and(|n| n != exact.as_str()));
    files
}

/// The entries of `dir`, sorted; empty when it cannot be read.
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<String> {
        NCCL.candidate_names()
    }

    #[test]
    fn cudarc_does_not_accept_the_name_nccl_ships_under() {
        let c = candidates();
        assert!(c.iter().any(|n| n == "libnccl.so"), "{c:?}");
        assert!(!c.iter().any(|n| n == "libnccl.so.2"), "{c:?}");
    }

    #[test]
    fn a_runtime_only_nccl_gets_the_link_to_make() {
        let found = [PathBuf::from("/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2")];
        let e = diagnose(&NCCL, false, &found, &candidates()).unwrap_err().to_string();
        assert!(e.contains("ln -sf /venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2"), "{e}");
        assert!(e.contains("/libnccl.so`"), "{e}");
        assert!(e.contains("LD_LIBRARY_PATH"), "{e}");
        assert!(e.contains("--device cpu"), "{e}");
    }

    #[test]
    fn an_accepted_name_off_the_loader_path_gets_the_directory_to_add() {
        let found = [PathBuf::from("/opt/nccl/lib/libnccl.so")];
        let e = diagnose(&NCCL, false, &found, &candidates()).unwrap_err().to_string();
        assert!(e.contains("export LD_LIBRARY_PATH=/opt/nccl/lib:"), "{e}");
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let e = diagnose(&CUBLAS, false, &[], &CUBLAS.candidate_names()).unwrap_err().to_string();
        assert!(e.contains("libcublas.so") && e.contains("pip install nvidia-cublas"), "{e}");
        assert!(e.contains("--device cpu"), "{e}");
    }

    #[test]
    fn a_loadable_library_is_fine_and_reports_where_it_is() {
        let found = [PathBuf::from("/x/libnccl.so.2"), PathBuf::from("/y/libnccl.so")];
        assert_eq!(diagnose(&NCCL, true, &found, &candidates()).unwrap(), Some(PathBuf::from("/y/libnccl.so")));
        assert_eq!(diagnose(&NCCL, true, &[], &candidates()).unwrap(), None);
    }

    #[test]
    fn finds_library_files_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["libnccl.so.2", "libnccl.so", "libnccl-net.so", "libcublas.so.12"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let names: Vec<_> = library_files(dir.path(), "nccl")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["libnccl.so", "libnccl.so.2"]);
    }
}
