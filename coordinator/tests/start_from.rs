//! `--netG` / `--netD`: a fresh run starts from networks saved elsewhere (PyTorch `.pth` files
//! written by torch, pyformats' committed fixtures: 32x32 colour, nz = ngf = ndf = 4), and files
//! that do not fit the run's networks are refused before any worker starts.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use safetensors::SafeTensors;

const TIMEOUT: Duration = Duration::from_secs(180);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pyformats/tests/fixtures").join(name)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The largest difference between the f32 tensors both safetensors files hold under `names`.
fn worst_difference(a: &[u8], b: &[u8], names: &[&str]) -> f32 {
    let (a, b) = (SafeTensors::deserialize(a).unwrap(), SafeTensors::deserialize(b).unwrap());
    let mut worst = 0.0f32;
    for name in names {
        let (x, y) = (f32s(a.tensor(name).unwrap().data()), f32s(b.tensor(name).unwrap().data()));
        assert_eq!(x.len(), y.len(), "{name}");
        worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
    }
    worst
}

#[test]
fn a_fresh_run_starts_from_pytorch_networks() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let (net_g, net_d) = (fixture("netG.pth"), fixture("netD.pth"));
    // A learning rate so small that one Adam step moves no weight by more than ~1e-9: the
    // weights after step 1 are the file's, not a fresh initialisation (N(0, 0.02)).
    let args = with_flags(
        small_run(2, &run_dir),
        &[
            "--nz",
            "4",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--lr",
            "1e-9",
            "--max-steps",
            "1",
            "--netG",
            net_g.to_str().unwrap(),
            "--netD",
            net_d.to_str().unwrap(),
        ],
    );
    run_coordinator(&args, TIMEOUT).assert_success();
    assert_eq!(checkpoint_steps(&run_dir), [0, 1]);

    let read = |step: &str, file: &str| std::fs::read(run_dir.join("checkpoints").join(step).join(file)).unwrap();
    let pth = |p: &Path| pyformats::pth::weights_as_safetensors(p).unwrap();
    let g_convs = ["main.0.weight", "main.3.weight", "main.6.weight", "main.9.weight"];
    let g_bn = ["main.1.weight", "main.1.bias", "main.4.weight", "main.7.bias"];
    let d_convs = ["main.0.weight", "main.2.weight", "main.5.weight", "main.8.weight"];
    // Step 0 is exactly the files, BatchNorm statistics included.
    let g0 = read("step_00000000", "generator.safetensors");
    let d0 = read("step_00000000", "discriminator.safetensors");
    let all_g: Vec<&str> =
        g_convs.iter().chain(&g_bn).copied().chain(["main.1.running_mean", "main.4.running_var"]).collect();
    assert_eq!(worst_difference(&g0, &pth(&net_g), &all_g), 0.0);
    assert_eq!(worst_difference(&d0, &pth(&net_d), &d_convs), 0.0);
    // Step 1 was trained from them by the workers.
    let g1 = read("step_00000001", "generator.safetensors");
    let d1 = read("step_00000001", "discriminator.safetensors");
    let moved_g = worst_difference(&g1, &pth(&net_g), &g_convs);
    let moved_d = worst_difference(&d1, &pth(&net_d), &d_convs);
    assert!(moved_g > 0.0 && moved_g < 1e-6, "generator moved by {moved_g}");
    assert!(moved_d > 0.0 && moved_d < 1e-6, "discriminator moved by {moved_d}");
}

#[test]
fn networks_that_do_not_fit_are_refused_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let g = fixture("netG.pth");
    let g_name = g.display().to_string();
    // small_run's networks: nz 16, ngf = ndf = 8.
    let f = run_coordinator(&with_flags(small_run(2, &run_dir), &["--netG", &g_name]), TIMEOUT);
    let want = format!(
        "--netG {g_name}: tensor main.0.weight has shape [4, 16, 4, 4], this run's generator needs [16, 32, 4, 4] (--nz 4 --ngf 4?)"
    );
    assert!(!f.status.success() && f.stderr.contains(&want) && !f.stderr.contains("panicked"), "{}", f.stderr);
    assert_eq!(f.status.code(), Some(2), "networks that do not fit are a usage error: {}", f.stderr);
    assert!(!run_dir.join("logs").exists(), "no worker was launched");
    assert!(!run_dir.join("run.json").exists(), "nothing was written");

    let d = fixture("netD.pth");
    let f =
        run_coordinator(&with_flags(small_run(2, &run_dir), &["--nz", "4", "--netD", d.to_str().unwrap()]), TIMEOUT);
    assert!(!f.status.success(), "{}", f.stderr);
    assert!(
        f.stderr.contains(
            "tensor main.0.weight has shape [4, 3, 4, 4], this run's discriminator needs [8, 3, 4, 4] (--ndf 4?)"
        ),
        "{}",
        f.stderr
    );
    // A generator given as the discriminator, a legacy file, a missing one.
    let f = run_coordinator(&with_flags(small_run(2, &run_dir), &["--netD", &g_name]), TIMEOUT);
    assert!(
        !f.status.success() && f.stderr.contains("--netD") && f.stderr.contains("this run's discriminator"),
        "{}",
        f.stderr
    );
    let legacy = fixture("legacy.pth");
    let f = run_coordinator(&with_flags(small_run(2, &run_dir), &["--netG", legacy.to_str().unwrap()]), TIMEOUT);
    assert!(!f.status.success() && f.stderr.contains("torch < 1.6"), "{}", f.stderr);
    let f = run_coordinator(&with_flags(small_run(2, &run_dir), &["--netG", "/no/netG.pth"]), TIMEOUT);
    assert!(
        !f.status.success() && f.stderr.contains("--netG /no/netG.pth") && f.stderr.contains("cannot read"),
        "{}",
        f.stderr
    );
    assert!(!run_dir.join("logs").exists(), "no worker was launched");

    // With --resume it is a usage error.
    let f = run_coordinator(&with_flags(resume_args(&run_dir, 4, &[]), &["--netG", &g_name]), TIMEOUT);
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("--netG") && f.stderr.contains("--resume"), "{}", f.stderr);
}
