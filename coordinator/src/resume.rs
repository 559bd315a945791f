//! Which checkpoint a resumed run, or the next generation after a failure, starts from.

use anyhow::{Context, bail};

use crate::checkpoint_store::CheckpointStore;
use crate::config::RunConfig;

/// The checkpoint a resumed run starts from: the newest one that passes its digests and loads,
/// and is not already at the end. A damaged one (truncated, bytes flipped) is set aside as
/// `checkpoints/damaged-step_NNNNNNNN` with a warning and the one before is tried. `Ok(None)`
/// when `allow_none` and no checkpoint is usable (a restart before the first checkpoint starts
/// over from step 0).
pub fn resume_point(store: &CheckpointStore, config: &RunConfig, allow_none: bool) -> anyhow::Result<Option<u64>> {
    let mut candidates = store.list()?;
    candidates.sort_by_key(|c| std::cmp::Reverse(c.step));
    for latest in candidates {
        match check_checkpoint(store, config, latest.step) {
            Ok(()) => {
                if latest.step >= config.total_steps {
                    dcgan_process::bail_usage!(
                        "--resume: the run is already at step {} of {}; raise --max-steps or --epochs to train further",
                        latest.step,
                        config.total_steps
                    );
                }
                tracing::info!(step = latest.step, dir = %latest.dir.display(), "resuming from checkpoint");
                return Ok(Some(latest.step));
            }
            Err(e) => {
                let aside = store.dir().join(format!("damaged-{}", CheckpointStore::dir_name(latest.step)));
                tracing::warn!(
                    "checkpoint {} is unusable ({e:#}): set aside as {}",
                    latest.dir.display(),
                    aside.display()
                );
                eprintln!(
                    "warning: checkpoint {} is unusable ({e:#}); falling back to an earlier one",
                    latest.dir.display()
                );
                std::fs::rename(&latest.dir, &aside)
                    .with_context(|| format!("cannot set {} aside", latest.dir.display()))?;
            }
        }
    }
    if allow_none {
        return Ok(None);
    }
    bail!("--resume: no usable checkpoint in {} to resume from", store.dir().display())
}

/// Checks a stored checkpoint fully (digests, names, shapes, the state document) before any
/// worker is started on it.
fn check_checkpoint(store: &CheckpointStore, config: &RunConfig, step: u64) -> anyhow::Result<()> {
    let files = store.read(step)?;
    let (gan, state) = kernels::Gan::load(&kernels::CheckpointFiles { files })?;
    if *gan.model_config() != config.model() {
        bail!("it holds networks {:?}, the run's are {:?}", gan.model_config(), config.model());
    }
    if state.step != step {
        bail!("state.json says step {}, the directory name says {step}", state.step);
    }
    Ok(())
}
