//! The live page: a run followed in a browser, served on the `/metrics` port. The page itself
//! (`coordinator/assets/live/`) is static and compiled in, so it works with no internet access;
//! it polls two JSON endpoints and draws its charts as inline SVG.
//!
//! | path | what |
//! | --- | --- |
//! | `/` | the page |
//! | `/assets/{app.js,style.css}` | its script and style |
//! | `/api/status` | the run as `GetStatus` shows it, as JSON, plus the sample grids drawn so far |
//! | `/api/steps?since=N` | the aggregated steps after the first N (at most 5000 per call) |
//! | `/samples/NAME.png` | a sample grid of the run directory |
//! | `/checkpoints/step_NNNNNNNN/FILE` | a stored checkpoint's file, to download |

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hyper::StatusCode;
use hyper::body::Bytes;
use proto::v1;
use serde_json::{Value, json};
use worker::telemetry::{HttpReply, Routes};

use crate::run_state::Run;

const INDEX_HTML: &str = include_str!("../assets/live/index.html");
const APP_JS: &str = include_str!("../assets/live/app.js");
const STYLE_CSS: &str = include_str!("../assets/live/style.css");
/// Steps per `/api/steps` answer: the page catches up on a long run in a few calls.
const STEPS_PER_CALL: usize = 5000;
/// What a checkpoint directory may hold (what `kernels::Gan::save` and the store write).
const CHECKPOINT_FILES: [&str; 5] =
    ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors", "state.json", "SHA256SUMS"];

/// The page's routes; the run is attached once it exists (the port is served from the start,
/// before the run is configured, so scrapers find it early).
pub struct LivePage {
    root: PathBuf,
    /// The current generation's run (a restart attaches the next).
    run: RwLock<Option<Arc<Run>>>,
}

impl LivePage {
    pub fn new(root: &Path) -> Arc<Self> {
        Arc::new(Self { root: root.to_path_buf(), run: RwLock::new(None) })
    }

    pub fn attach(&self, run: Arc<Run>) {
        *self.run.write().unwrap_or_else(|p| p.into_inner()) = Some(run);
    }

    fn run(&self) -> Option<Arc<Run>> {
        self.run.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The routes for [`worker::telemetry::MetricsListener::serve_with`].
    pub fn routes(self: &Arc<Self>) -> Routes {
        let page = Arc::clone(self);
        Arc::new(move |path: &str| page.answer(path))
    }

    fn answer(&self, path_and_query: &str) -> Option<HttpReply> {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        match path {
            "/" | "/index.html" => Some(text(INDEX_HTML, "text/html; charset=utf-8")),
            "/assets/app.js" => Some(text(APP_JS, "text/javascript; charset=utf-8")),
            "/assets/style.css" => Some(text(STYLE_CSS, "text/css; charset=utf-8")),
            "/api/status" => Some(match self.run() {
                Some(run) => json_reply(&self.status_json(&run)),
                None => json_reply(&json!({ "state": "STARTING" })),
            }),
            "/api/steps" => {
                let since = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("since="))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                let steps = self.run().map(|r| r.history(since, STEPS_PER_CALL)).unwrap_or_default();
                Some(json_reply(&json!({ "since": since, "steps": steps })))
            }
            _ => {
                if let Some(name) = path.strip_prefix("/samples/") {
                    return self.sample(name);
                }
                if let Some(rest) = path.strip_prefix("/checkpoints/") {
                    return self.checkpoint_file(rest);
                }
                None
            }
        }
    }

    /// A grid PNG: `real.png` or `fake_epoch_NNN.png`, nothing else (no path tricks).
    fn sample(&self, name: &str) -> Option<HttpReply> {
        let ok = name == "real.png"
            || name
                .strip_prefix("fake_epoch_")
                .and_then(|r| r.strip_suffix(".png"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return None;
        }
        let bytes = std::fs::read(self.root.join("samples").join(name)).ok()?;
        Some(HttpReply {
            status: StatusCode::OK,
            content_type: "image/png",
            body: Bytes::from(bytes),
            cache_control: Some("no-cache"),
        })
    }

    /// `step_NNNNNNNN/FILE` of a stored checkpoint, as a download.
    fn checkpoint_file(&self, rest: &str) -> Option<HttpReply> {
        let (dir, file) = rest.split_once('/')?;
        let step_ok = dir.strip_prefix("step_").is_some_and(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()));
        if !step_ok || !CHECKPOINT_FILES.contains(&file) {
            return None;
        }
        let bytes = std::fs::read(self.root.join("checkpoints").join(dir).join(file)).ok()?;
        let content_type = if file.ends_with(".json") { "application/json" } else { "application/octet-stream" };
        Some(HttpReply { status: StatusCode::OK, content_type, body: Bytes::from(bytes), cache_control: None })
    }

    fn status_json(&self, run: &Run) -> Value {
        let s = run.status();
        let mut grids: Vec<String> = std::fs::read_dir(self.root.join("samples"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("fake_epoch_") && n.ends_with(".png"))
                    .collect()
            })
            .unwrap_or_default();
        grids.sort();
        let mut v = status_json(&s, &grids);
        v["eval_every"] = json!(run.config.eval_every);
        v["samples_pending"] = json!(run.samples_pending());
        v
    }
}

fn text(body: &'static str, content_type: &'static str) -> HttpReply {
    HttpReply { status: StatusCode::OK, content_type, body: Bytes::from_static(body.as_bytes()), cache_control: None }
}

fn json_reply(v: &Value) -> HttpReply {
    HttpReply {
        status: StatusCode::OK,
        content_type: "application/json",
        body: Bytes::from(v.to_string()),
        cache_control: Some("no-store"),
    }
}

fn state_name(state: i32) -> &'static str {
    v1::RunState::try_from(state).map(|s| s.as_str_name()).unwrap_or("RUN_STATE_UNSPECIFIED")
}

/// `GetStatus`'s answer as the page reads it (names as in the proto, enums as their names).
pub fn status_json(s: &v1::RunStatus, grids: &[String]) -> Value {
    let workers: Vec<Value> = s
        .workers
        .iter()
        .map(|w| {
            json!({
                "rank": w.rank,
                "state": v1::WorkerState::try_from(w.state).map(|x| x.as_str_name()).unwrap_or("WORKER_STATE_UNSPECIFIED"),
                "hostname": w.hostname,
                "pid": w.pid,
                "device": w.device,
                "last_step": w.last_step,
                "seconds_since_heartbeat": w.seconds_since_heartbeat,
            })
        })
        .collect();
    let checkpoints: Vec<Value> = s
        .checkpoints
        .iter()
        .map(|c| json!({ "step": c.step, "epoch": c.epoch, "path": c.path, "total_size": c.total_size }))
        .collect();
    let health = s.health.as_ref().map(|h| {
        json!({
            "d_won": h.d_won,
            "nonfinite_loss": h.nonfinite_loss,
            "mode_collapse": h.mode_collapse,
            "warnings": h.warnings,
        })
    });
    let evaluations: Vec<Value> =
        s.evaluations.iter().map(|e| json!({ "epoch": e.epoch, "step": e.step, "fid": e.fid })).collect();
    json!({
        "run_id": s.run_id,
        "generation": s.generation,
        "state": state_name(s.state).trim_start_matches("RUN_STATE_"),
        "error": s.error,
        "epoch": s.epoch,
        "epochs": s.epochs,
        "step": s.step,
        "total_steps": s.total_steps,
        "world_size": s.world_size,
        "dataset": s.dataset,
        "workers": workers,
        "checkpoints": checkpoints,
        "health": health,
        "evaluations": evaluations,
        "grids": grids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grid_and_checkpoint_names_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("samples")).unwrap();
        std::fs::write(dir.path().join("samples/fake_epoch_003.png"), b"png").unwrap();
        std::fs::write(dir.path().join("secret.txt"), b"no").unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints/step_00000004")).unwrap();
        std::fs::write(dir.path().join("checkpoints/step_00000004/state.json"), b"{}").unwrap();
        let page = LivePage::new(dir.path());
        assert!(page.answer("/samples/fake_epoch_003.png").is_some());
        assert!(page.answer("/checkpoints/step_00000004/state.json").is_some());
        for bad in [
            "/samples/../secret.txt",
            "/samples/fake_epoch_.png",
            "/samples/fake_epoch_1/../../secret.txt",
            "/checkpoints/step_00000004/../../secret.txt",
            "/checkpoints/../secret.txt",
            "/checkpoints/step_0004/state.json",
            "/nope",
        ] {
            assert!(page.answer(bad).is_none(), "{bad} was served");
        }
        // The page and its assets are served before the run exists; the status says so.
        assert!(page.answer("/").is_some() && page.answer("/assets/app.js").is_some());
        let status = page.answer("/api/status").unwrap();
        assert!(std::str::from_utf8(&status.body).unwrap().contains("STARTING"));
    }
}
