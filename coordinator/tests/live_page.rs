//! The live page end to end: a real run with `--metrics-listen`, its page driven by headless
//! Chromium through playwright-core (`coordinator/tests/live_page.cjs`). `.ci/install-tools.sh`
//! installs both; without them this test fails saying what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Where playwright-core is installed: `DCGAN_NODE_MODULES`, else `.ci/node/node_modules`.
fn node_modules() -> PathBuf {
    std::env::var_os("DCGAN_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/node/node_modules"))
}

#[test]
fn the_live_page_follows_a_real_run_in_chromium() {
    let modules = node_modules();
    assert!(
        modules.join("playwright-core").is_dir(),
        "playwright-core is not installed in {} (run .ci/install-tools.sh, or set DCGAN_NODE_MODULES)",
        modules.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)");

    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    // 64x64 images make each of the 5 epochs last seconds, long enough to watch the grid change.
    let args = watchable_run(2, &run_dir, 1440, 5, &["--metrics-listen", "127.0.0.1:0", "--metrics-linger", "60"]);
    let coordinator = Running::start(&args, &run_dir);
    let addr = std::fs::read_to_string(run_dir.join("metrics.addr")).expect("metrics.addr").trim().to_string();
    let shot = tmp.path().join("page.png");
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/live_page.cjs"))
        .arg(format!("http://{addr}/"))
        .arg(&shot)
        .arg("5") // 5 epochs
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "the page check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the check prints JSON");
    assert_eq!(r["problems"], serde_json::json!([]), "console errors or failed requests: {r}");
    let grids = r["grids"].as_array().expect("grids");
    assert!(grids[0].as_str().unwrap().starts_with("fake_epoch_") && grids[0] != grids[1], "{r}");
    // 8 x 8 images of 64 px with 2 px padding.
    assert_eq!(r["grid_size"], serde_json::json!([530, 530]), "{r}");
    let mid = &r["mid"];
    assert!(mid["points"].as_array().unwrap().iter().all(|p| p == &mid["steps"]), "{r}");

    let total = 5 * (1440 / 24);
    let end = &r["end"];
    assert_eq!(end["total"], total, "{r}");
    assert_eq!(end["steps"], total, "{r}");
    assert_eq!(end["shown_step"], total, "{r}");
    for series in ["loss_D", "loss_G", "D(x)", "D(G(z)) before D's update", "D(G(z)) after", "images/s"] {
        assert_eq!(end["series"][series], total, "chart {series}: {r}");
    }
    assert_eq!(end["workers"], 2, "{r}");
    assert_eq!(end["thumbnails"], 5, "the generator at the end of each of the 5 epochs: {r}");
    // The real samples have their own panel; the generator's panel shows the newest generator
    // grid (the --sample-every grid of the last step, drawn after its epoch's), never a real one.
    assert_eq!(end["real"], serde_json::json!([true, "/samples/real.png"]), "{r}");
    assert_eq!(end["grids_fit"], true, "a grid overflows its column: {r}");
    assert!(grids.iter().all(|g| g.as_str().is_some_and(|g| g.starts_with("fake_"))), "{r}");
    assert_eq!(end["latest_grid"], format!("fake_step_{total:08}.png"), "{r}");
    assert_eq!(end["latest_label"], format!("at step {total}"), "{r}");
    assert_eq!((end["shown_epoch"].as_str(), end["epochs"].as_str()), (Some("5"), Some("5")), "{r}");
    for step in [100, 200, 300] {
        assert!(
            run_dir.join(format!("samples/fake_step_{step:08}.png")).is_file(),
            "--sample-every 100's grid of step {step}"
        );
    }
    let links: Vec<&str> = end["checkpoint_links"].as_array().unwrap().iter().filter_map(|l| l.as_str()).collect();
    assert!(links.iter().any(|l| l.ends_with(&format!("step_{total:08}/generator.safetensors"))), "{r}");
    // A checkpoint link downloads the stored file.
    let link = links.iter().find(|l| l.ends_with("generator.safetensors")).expect("a generator link");
    let served = http_get_bytes(&addr, link);
    let stored = std::fs::read(run_dir.join(link.trim_start_matches('/'))).expect("stored file");
    assert!(served == stored, "the download is the stored file");
    assert!(shot.is_file(), "screenshot written");
    if let Some(keep) = std::env::var_os("DCGAN_LIVE_PAGE_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("copy the screenshot");
    }
    drop(coordinator);
}

fn http_get_bytes(addr: &str, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..split]));
    buf[split..].to_vec()
}
