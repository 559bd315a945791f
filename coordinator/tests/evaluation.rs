//! `--eval-every`: the coordinator scores the generator with FID at the ends of epochs, and the
//! figure is the one `dcgan evaluate fid`'s code gives for the same checkpoint, classifier and z.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dcgan_fid::fid_score::{ClassifierOptions, FidReference};
use proto::v1;
use proto::v1::coordinator_client::CoordinatorClient;

const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn fid_every_epoch_reaches_evals_jsonl_and_status_and_matches_the_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    // 240 samples, 10 steps per epoch, 3 epochs; 64x64 images make an epoch last long enough
    // for GetStatus to see the first evaluations while the run goes on.
    let args = watchable_run(2, &run_dir, 240, 3, &["--eval-every", "1", "--eval-count", "48"]);
    let coordinator = Running::start(&args, &run_dir);

    // GetStatus shows the evaluations while the run goes on (or at least before it ends).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let seen = rt.block_on(async {
        let mut c = CoordinatorClient::connect(coordinator.url()).await.expect("connect");
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match c.get_status(v1::GetStatusRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    seen = s.evaluations.clone();
                    // The last evaluation comes after the workers finish (the coordinator waits
                    // for it before it stops serving), so poll until all three are in.
                    if seen.len() == 3 {
                        break;
                    }
                }
                Err(_) => break, // the coordinator has shut down
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    coordinator.wait(TIMEOUT).assert_success();
    assert!(!seen.is_empty(), "GetStatus never showed an evaluation");
    assert!(seen.iter().all(|e| e.fid.is_finite() && e.fid > 0.0 && e.count == 48), "{seen:?}");

    let evals: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("evals.jsonl"))
        .expect("evals.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let at: Vec<(u64, u64)> =
        evals.iter().map(|e| (e["epoch"].as_u64().unwrap(), e["step"].as_u64().unwrap())).collect();
    assert_eq!(at, vec![(0, 10), (1, 20), (2, 30)], "one evaluation per epoch, at its last step");
    for (e, s) in evals.iter().zip(&seen) {
        assert_eq!(e["fid"].as_f64(), Some(s.fid), "GetStatus and evals.jsonl agree");
    }

    // The same checkpoint, classifier and z through the command's code give the same figure.
    let classifier = run_dir.join("eval/fid-classifier.safetensors");
    assert!(classifier.is_file(), "the classifier is cached in the run directory");
    let spec: data::DatasetSpec = "shapes".parse().expect("spec");
    let real = spec.load(64, Some(240)).expect("shapes");
    let labels = real.labels.clone().expect("labels");
    let mut reference =
        FidReference::prepare("shapes", &real, &labels, 48, &ClassifierOptions::default(), Some(&classifier))
            .expect("reference");
    let dir = run_dir.join("checkpoints/step_00000030");
    let files = ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).expect("checkpoint file")))
        .collect();
    let (mut gan, _) = kernels::Gan::load(&kernels::CheckpointFiles { files }).expect("checkpoint loads");
    let last = evals.last().expect("an evaluation");
    let fid = reference.score_generator(&mut gan, last["seed"].as_u64().expect("seed")).expect("fid");
    assert_eq!(Some(fid), last["fid"].as_f64(), "the run's FID is the command's");
}

#[test]
fn eval_settings_that_cannot_work_are_refused_before_the_run_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(1, &run_dir), &["--data-limit", "100", "--eval-every", "1", "--eval-count", "500"]);
    let f = run_coordinator(&args, TIMEOUT);
    assert!(!f.status.success());
    assert!(f.stderr.contains("--eval-count 500 is more than the 100 images"), "{}", f.stderr);
    assert!(!run_dir.join("run.json").exists(), "nothing was written");
}
