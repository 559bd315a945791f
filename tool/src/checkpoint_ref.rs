//! What `--checkpoint PATH` may name, and loading it.
//!
//! Users point the tool at whatever they have at hand: a run directory (meaning its latest
//! complete checkpoint), the run's `checkpoints/` folder, one `step_NNNNNNNN/` checkpoint, or a
//! bare generator file: `.safetensors`, or PyTorch's `netG.pth` read natively (`pyformats::pth`). Resolving all of
//! these in one place gives every command the same rules and the same error messages.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kernels::Gan;
use kernels::checkpoint::{DISCRIMINATOR_FILE, GENERATOR_FILE, OPTIMIZER_FILE, STATE_FILE};
use kernels::{CheckpointFiles, ModelConfig};

/// Files a checkpoint directory must hold to count as complete.
const REQUIRED: [&str; 4] = [GENERATOR_FILE, DISCRIMINATOR_FILE, OPTIMIZER_FILE, STATE_FILE];

/// Where the weights come from, once the path is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A full checkpoint directory (both networks, optimiser, state).
    Checkpoint(PathBuf),
    /// A generator `state_dict` alone (safetensors or `.pth`); the discriminator is absent.
    GeneratorFile(PathBuf),
}

/// A loaded model and what it was loaded from.
pub struct LoadedModel {
    pub gan: Gan,
    pub source: Source,
    /// Training step of the checkpoint, when it has a state document.
    pub step: Option<u64>,
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        self.gan.model_config()
    }

    /// Refuses commands that need a trained discriminator on a generator-only file, whose D
    /// would be random weights and give meaningless features.
    pub fn require_discriminator(&self, command: &str) -> Result<()> {
        if let Source::GeneratorFile(p) = &self.source {
            bail!(
                "`{command}` needs a trained discriminator, but {} holds only a generator; \
                 pass a checkpoint directory or a run directory",
                p.display()
            );
        }
        Ok(())
    }
}

/// Resolves `path` to a checkpoint directory or a generator file, or says what was expected.
pub fn resolve(path: &Path) -> Result<Source> {
    if !path.exists() {
        bail!("checkpoint {}: no such file or directory", path.display());
    }
    if path.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if [".safetensors", ".pth", ".pt"].iter().any(|ext| name.ends_with(ext)) {
            return Ok(Source::GeneratorFile(path.to_path_buf()));
        }
        bail!("checkpoint {}: expected a directory or a generator .safetensors or .pth file", path.display());
    }
    if is_complete(path) {
        return Ok(Source::Checkpoint(path.to_path_buf()));
    }
    for dir in [path.join("checkpoints"), path.to_path_buf()] {
        if let Some(latest) = latest_in(&dir)? {
            return Ok(Source::Checkpoint(latest));
        }
    }
    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|f| !path.join(f).is_file()).collect();
    if missing.len() < REQUIRED.len() {
        bail!("checkpoint {}: incomplete, missing {}", path.display(), missing.join(", "));
    }
    bail!(
        "{} is not a checkpoint: expected {} (a checkpoint directory), or a run directory with \
         checkpoints/step_NNNNNNNN/ inside, or a generator .safetensors or .pth file",
        path.display(),
        REQUIRED.join(", ")
    )
}

fn is_complete(dir: &Path) -> bool {
    REQUIRED.iter().all(|f| dir.join(f).is_file())
}

/// The `step_NNNNNNNN` directory with the highest step that holds every file; directories still
/// being written (partial, or the store's temporary names) are skipped.
fn latest_in(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step_")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let p = entry.path();
        if is_complete(&p) && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, p));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Resolves and loads `path`.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let source = resolve(path)?;
    match &source {
        Source::Checkpoint(dir) => {
            let files =
                CheckpointFiles::read_from_dir(dir).with_context(|| format!("reading checkpoint {}", dir.display()))?;
            let (gan, state) = Gan::load(&files).with_context(|| format!("loading checkpoint {}", dir.display()))?;
            Ok(LoadedModel { gan, source, step: Some(state.step) })
        }
        Source::GeneratorFile(file) => {
            // A .pth state dict becomes safetensors bytes first; safetensors are read as they are.
            let bytes = pyformats::pth::weights_as_safetensors(file)?;
            let name = file.display().to_string();
            let gan =
                Gan::from_generator_file(&bytes, &name, 0).with_context(|| format!("loading generator {name}"))?;
            Ok(LoadedModel { gan, source, step: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_complete_step() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        for (name, complete) in [("step_00000010", true), ("step_00000030", false), ("step_00000020", true)] {
            let d = ck.join(name);
            std::fs::create_dir_all(&d).unwrap();
            let files: &[&str] = if complete { &REQUIRED } else { &REQUIRED[..2] };
            for f in files {
                std::fs::write(d.join(f), b"x").unwrap();
            }
        }
        assert_eq!(resolve(dir.path()).unwrap(), Source::Checkpoint(ck.join("step_00000020")));
        assert_eq!(resolve(&ck).unwrap(), Source::Checkpoint(ck.join("step_00000020")));
        let e = resolve(&ck.join("step_00000030")).unwrap_err().to_string();
        assert!(e.contains("incomplete"), "{e}");
        let e = resolve(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
    }
}
