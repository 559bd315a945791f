//! The live page: a run followed in a browser, served on the `/metrics` port. The page itself
//! (`coordinator/assets/live/`) is static and compiled in, so it works with no internet access;
//! it polls two JSON endpoints and draws its charts as inline SVG.
//!
//! | path | what | with a run token (`--token`) |
//! | --- | --- | --- |
//! | `/` | the page | the token, unless `--open-status` |
//! | `/assets/{app.js,style.css}` | its script and style | the token, unless `--open-status` |
//! | `/api/status` | the run as `GetStatus` shows it, as JSON, plus the sample grids drawn so far | the token, unless `--open-status` |
//! | `/api/steps?since=N` | the aggregated steps after the first N (at most 5000 per call) | the token, unless `--open-status` |
//! | `/samples/NAME.png` | a sample grid of the run directory | the token, unless `--open-status` |
//! | `/checkpoints/step_NNNNNNNN/FILE` | a stored checkpoint's file, to download | the token, always |
//! | `/metrics` | Prometheus's numbers (served by [`dcgan_process::telemetry`]) | open |
//!
//! The policy is the gRPC port's ([`proto::auth`]); the token is taken as `Authorization:
//! Bearer TOKEN` or as the password of HTTP Basic (a browser's prompt). Without a token
//! everything is open. Only the names above are served: a path is parsed into a [`Route`]
//! whose names are checked character by character (no `..`, no `/`, no percent-escapes), so
//! nothing outside the run directory's samples and checkpoints can be reached.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use dcgan_process::telemetry::{HttpReply, HttpRoutes, Routes};
use hyper::StatusCode;
use hyper::body::Bytes;
use proto::auth::Access;
use proto::v1;
use serde_json::{Value, json};

use crate::run_view::RunView;

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
    run: RwLock<Option<RunView>>,
}

impl LivePage {
    pub fn new(root: &Path) -> Arc<Self> {
        Arc::new(Self { root: root.to_path_buf(), run: RwLock::new(None) })
    }

    pub fn attach(&self, run: RunView) {
        *self.run.write().unwrap_or_else(|p| p.into_inner()) = Some(run);
    }

    fn run(&self) -> Option<RunView> {
        self.run.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The routes for [`dcgan_process::telemetry::MetricsListener::serve_with`].
    pub fn routes(self: &Arc<Self>) -> Routes {
        Arc::clone(self) as Routes
    }

    fn answer(&self, path_and_query: &str) -> Option<HttpReply> {
        match Route::parse(path_and_query)? {
            Route::Page => Some(text(INDEX_HTML, "text/html; charset=utf-8")),
            Route::Script => Some(text(APP_JS, "text/javascript; charset=utf-8")),
            Route::Style => Some(text(STYLE_CSS, "text/css; charset=utf-8")),
            Route::Status => Some(match self.run() {
                Some(run) => json_reply(&self.status_json(&run)),
                None => json_reply(&json!({ "state": "STARTING" })),
            }),
            Route::Steps { since } => {
                let steps = self.run().map(|r| r.history.page(since, STEPS_PER_CALL)).unwrap_or_default();
                Some(json_reply(&json!({ "since": since, "steps": steps })))
            }
            Route::Sample(name) => self.sample(name),
            Route::Checkpoint { dir, file } => self.checkpoint_file(dir, file),
        }
    }

    /// A grid PNG (a name [`Route::parse`] checked).
    fn sample(&self, name: &str) -> Option<HttpReply> {
        let bytes = std::fs::read(self.root.join("samples").join(name)).ok()?;
        Some(HttpReply {
            status: StatusCode::OK,
            content_type: "image/png",
            body: Bytes::from(bytes),
            cache_control: Some("no-cache"),
        })
    }

    /// `step_NNNNNNNN/FILE` of a stored checkpoint (names [`Route::parse`] checked), as a download.
    fn checkpoint_file(&self, dir: &str, file: &str) -> Option<HttpReply> {
        let bytes = std::fs::read(self.root.join("checkpoints").join(dir).join(file)).ok()?;
        let content_type = if file.ends_with(".json") { "application/json" } else { "application/octet-stream" };
        Some(HttpReply { status: StatusCode::OK, content_type, body: Bytes::from(bytes), cache_control: None })
    }

    fn status_json(&self, run: &RunView) -> Value {
        let s = run.status();
        // (modified, name) of every generator grid: epoch ends and --sample-every steps.
        let mut drawn: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(self.root.join("samples"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let grid = Route::parse(&format!("/samples/{name}")).is_some() && name != "real.png";
                        let modified = e.metadata().and_then(|m| m.modified()).ok()?;
                        grid.then_some((modified, name))
                    })
                    .collect()
            })
            .unwrap_or_default();
        drawn.sort();
        let latest = drawn.last().map(|(_, name)| json!({ "name": name, "label": grid_label(name) }));
        let mut grids: Vec<String> =
            drawn.into_iter().map(|(_, n)| n).filter(|n| n.starts_with("fake_epoch_")).collect();
        grids.sort();
        let mut v = status_json(&s, &grids);
        v["latest_grid"] = latest.unwrap_or(Value::Null);
        v["sample_every"] = json!(run.run.config.sample_every);
        v["eval_every"] = json!(run.run.config.eval_every);
        v["samples_pending"] = json!(run.samples.pending());
        v
    }
}

/// How the page names a generator grid: "step 300" or "end of epoch 2" (1-based, as the
/// header counts epochs).
fn grid_label(name: &str) -> String {
    let number = |prefix: &str| name.strip_prefix(prefix)?.strip_suffix(".png")?.parse::<u64>().ok();
    match (number("fake_step_"), number("fake_epoch_")) {
        (Some(step), _) => format!("step {step}"),
        (_, Some(epoch)) => format!("end of epoch {}", epoch + 1),
        _ => name.to_string(),
    }
}

impl HttpRoutes for LivePage {
    fn access(&self, path_and_query: &str) -> Option<Access> {
        Route::parse(path_and_query).map(|r| r.access())
    }

    fn answer(&self, path_and_query: &str) -> Option<HttpReply> {
        LivePage::answer(self, path_and_query)
    }
}

/// What the page serves: every path that is answered is one of these, with its names checked.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Page,
    Script,
    Style,
    Status,
    Steps {
        since: usize,
    },
    /// `real.png`, `fake_epoch_NNN.png` or `fake_step_NNNNNNNN.png`.
    Sample(&'a str),
    /// `step_NNNNNNNN` and one of [`CHECKPOINT_FILES`].
    Checkpoint {
        dir: &'a str,
        file: &'a str,
    },
}

impl<'a> Route<'a> {
    /// The route of a request's path and query; `None` for anything else, including every
    /// name that is not exactly a grid's or a checkpoint file's (no path tricks).
    fn parse(path_and_query: &'a str) -> Option<Self> {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        match path {
            "/" | "/index.html" => Some(Route::Page),
            "/assets/app.js" => Some(Route::Script),
            "/assets/style.css" => Some(Route::Style),
            "/api/status" => Some(Route::Status),
            "/api/steps" => {
                let since = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("since="))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                Some(Route::Steps { since })
            }
            _ => {
                if let Some(name) = path.strip_prefix("/samples/") {
                    let numbered = |prefix: &str| {
                        name.strip_prefix(prefix)
                            .and_then(|r| r.strip_suffix(".png"))
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    };
                    let grid = name == "real.png" || numbered("fake_epoch_") || numbered("fake_step_");
                    return grid.then_some(Route::Sample(name));
                }
                let (dir, file) = path.strip_prefix("/checkpoints/")?.split_once('/')?;
                let step =
                    dir.strip_prefix("step_").is_some_and(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()));
                (step && CHECKPOINT_FILES.contains(&file)).then_some(Route::Checkpoint { dir, file })
            }
        }
    }

    /// Its class in the run's access policy: a checkpoint is the model and its optimizer state,
    /// the rest are read-only views of the run.
    fn access(&self) -> Access {
        match self {
            Route::Checkpoint { .. } => Access::Secret,
            _ => Access::Status,
        }
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
                "device": w.device.map(|d| d.to_string()).unwrap_or_default(),
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
    fn grids_are_labelled_by_step_or_epoch() {
        assert_eq!(grid_label("fake_step_00000300.png"), "step 300");
        assert_eq!(grid_label("fake_epoch_001.png"), "end of epoch 2");
    }

    #[test]
    fn only_grid_and_checkpoint_names_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("samples")).unwrap();
        std::fs::write(dir.path().join("samples/fake_epoch_003.png"), b"png").unwrap();
        std::fs::write(dir.path().join("samples/fake_step_00000300.png"), b"png").unwrap();
        std::fs::write(dir.path().join("secret.txt"), b"no").unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints/step_00000004")).unwrap();
        std::fs::write(dir.path().join("checkpoints/step_00000004/state.json"), b"{}").unwrap();
        let page = LivePage::new(dir.path());
        assert!(page.answer("/samples/fake_epoch_003.png").is_some());
        assert!(page.answer("/samples/fake_step_00000300.png").is_some());
        assert!(page.answer("/checkpoints/step_00000004/state.json").is_some());
        for bad in [
            "/samples/../secret.txt",
            "/samples/fake_epoch_.png",
            "/samples/fake_step_.png",
            "/samples/fake_step_12/../../secret.txt",
            "/samples/fake_epoch_1/../../secret.txt",
            "/samples/..%2fsecret.txt",
            "/samples/%2e%2e/secret.txt",
            "/samples//etc/passwd",
            "/checkpoints/step_00000004/../../secret.txt",
            "/checkpoints/step_00000004/%2e%2e%2fstate.json",
            "/checkpoints/../secret.txt",
            "/checkpoints/step_0004/state.json",
            "/checkpoints//etc/passwd",
            "/checkpoints/step_00000004//etc/passwd",
            "//checkpoints/step_00000004/state.json",
            "/./samples/fake_epoch_003.png",
            "/nope",
        ] {
            assert!(page.answer(bad).is_none(), "{bad} was served");
            assert_eq!(HttpRoutes::access(&*page, bad), None, "{bad} is a route");
        }
        // Checkpoints are secret, whether they exist or not; the rest are status views.
        assert_eq!(HttpRoutes::access(&*page, "/checkpoints/step_00000004/state.json"), Some(Access::Secret));
        assert_eq!(HttpRoutes::access(&*page, "/checkpoints/step_00000009/SHA256SUMS"), Some(Access::Secret));
        for view in ["/", "/index.html", "/assets/app.js", "/api/status", "/api/steps?since=3", "/samples/real.png"] {
            assert_eq!(HttpRoutes::access(&*page, view), Some(Access::Status), "{view}");
        }
        // The page and its assets are served before the run exists; the status says so.
        assert!(page.answer("/").is_some() && page.answer("/assets/app.js").is_some());
        let status = page.answer("/api/status").unwrap();
        assert!(std::str::from_utf8(&status.body).unwrap().contains("STARTING"));
    }
}
