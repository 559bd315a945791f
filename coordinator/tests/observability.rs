//! Observability end to end: a short real training with `--metrics-listen`, the coordinator's
//! and a worker's `/metrics` scraped and parsed with a real Prometheus text-format parser, their
//! values checked against `metrics.jsonl`; the Grafana dashboard's queries checked against the
//! scraped names; the deploy configs parsed.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use prometheus_parse::{Scrape, Value};

const TIMEOUT: Duration = Duration::from_secs(300);

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("GET {path}: {head}")));
    }
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    Ok(body.to_string())
}

fn scrape(addr: &str) -> std::io::Result<(Scrape, String)> {
    let body = http_get(addr, "/metrics")?;
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
    Ok((scrape, body))
}

/// The value of the series `name` whose labels include `labels` (gauges, counters, untyped).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).and_then(
        |x| match x.value {
            Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => Some(v),
            _ => None,
        },
    )
}

fn must(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape"))
}

/// The `+Inf` bucket (the number of observations) of a histogram series.
fn histogram_count(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .and_then(|x| match &x.value {
            Value::Histogram(b) => b.iter().find(|c| c.less_than.is_infinite()).map(|c| c.count),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}{labels:?}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
}

/// Every sample name in the text format (histogram series as `_bucket`, `_sum`, `_count`).
fn names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The worker's metrics address, from the line it logs after joining.
fn worker_metrics_addr(run_dir: &Path, rank: usize) -> Option<String> {
    let log = std::fs::read_to_string(run_dir.join(format!("logs/worker-{rank}.log"))).ok()?;
    let rest = log.split("metrics listening on http://").nth(1)?;
    rest.split("/metrics").next().map(str::to_string)
}

#[test]
fn metrics_endpoints_agree_with_metrics_jsonl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(2, &run_dir),
        &[
            "--data-limit",
            "100",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-linger",
            "6",
            "--checksum-every",
            "2",
            "--eval-every",
            "1",
            "--eval-count",
            "32",
        ],
    );
    let running = Running::start(&args, &run_dir);
    let addr = std::fs::read_to_string(run_dir.join("metrics.addr")).expect("metrics.addr").trim().to_string();

    // From the start the run is described: its size and its health, all well.
    let (first, _) = scrape(&addr).expect("first scrape");
    assert_eq!(must(&first, "dcgan_workers", &[]), 2.0);
    assert_eq!(must(&first, "dcgan_total_steps", &[]), 8.0);
    assert_eq!(must(&first, "dcgan_worker_restarts_total", &[]), 0.0);
    assert!(first.samples.iter().any(|s| s.metric == "dcgan_run_info" && s.labels.get("run_id").is_some()));

    // Poll until the last step, the final checkpoint and a sample grid are in.
    let deadline = Instant::now() + TIMEOUT;
    let mut max_alive = 0.0f64;
    let (coord, coord_body) = loop {
        assert!(Instant::now() < deadline, "the run did not reach step 8 in time");
        let (s, body) = scrape(&addr).expect("scrape while running");
        max_alive = max_alive.max(value(&s, "dcgan_workers_alive", &[]).unwrap_or(0.0));
        let done = value(&s, "dcgan_step", &[]) == Some(8.0)
            && value(&s, "dcgan_checkpoint_step", &[]) == Some(8.0)
            && value(&s, "dcgan_sample_diversity_ratio", &[]).is_some()
            && value(&s, "dcgan_fid_epoch", &[]) == Some(1.0);
        if done {
            break (s, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    let lines = metrics(&run_dir);
    let last = lines.last().expect("a metrics line");
    assert_eq!(last["step"], 8);
    // The FID gauge is the last line of evals.jsonl.
    let evals = std::fs::read_to_string(run_dir.join("evals.jsonl")).expect("evals.jsonl");
    let last_eval: serde_json::Value = serde_json::from_str(evals.lines().last().expect("an eval")).expect("json");
    assert!(close(must(&coord, "dcgan_fid", &[]), last_eval["fid"].as_f64().expect("fid")), "{last_eval}");
    let f = |k: &str| last[k].as_f64().unwrap_or_else(|| panic!("{k} in {last}"));
    for (series, labels, key) in [
        ("dcgan_epoch", &[][..], "epoch"),
        ("dcgan_loss_d", &[], "loss_d"),
        ("dcgan_loss_g", &[], "loss_g"),
        ("dcgan_d_x", &[], "d_x"),
        ("dcgan_d_g_z", &[("when", "before_d_update")], "d_g_z1"),
        ("dcgan_d_g_z", &[("when", "after_d_update")], "d_g_z2"),
        ("dcgan_images_per_second", &[], "images_per_sec"),
        ("dcgan_global_batch", &[], "global_batch"),
        ("dcgan_step_phase_seconds", &[("phase", "data")], "data_seconds"),
        ("dcgan_step_phase_seconds", &[("phase", "compute")], "compute_seconds"),
        ("dcgan_step_phase_seconds", &[("phase", "all_reduce")], "all_reduce_seconds"),
    ] {
        let got = must(&coord, series, labels);
        assert!(close(got, f(key)), "{series}{labels:?} = {got}, metrics.jsonl {key} = {}", f(key));
    }
    assert_eq!(must(&coord, "dcgan_steps_total", &[]), 8.0);
    let images: f64 = lines.iter().map(|l| l["global_batch"].as_f64().unwrap_or(0.0)).sum();
    assert_eq!(must(&coord, "dcgan_images_total", &[]), images);
    assert_eq!(histogram_count(&coord, "dcgan_step_phase_duration_seconds", &[("phase", "all_reduce")]), 8.0);
    assert!(must(&coord, "dcgan_checkpoint_size_bytes", &[]) > 1000.0);
    assert!(must(&coord, "dcgan_checkpoint_age_seconds", &[]) >= 0.0);
    assert!(must(&coord, "dcgan_checkpoints_stored_total", &[]) >= 2.0);
    eprintln!("sample diversity ratio {:?}", value(&coord, "dcgan_sample_diversity_ratio", &[]));
    for h in ["dcgan_health_d_won", "dcgan_health_nonfinite_loss", "dcgan_health_mode_collapse"] {
        assert_eq!(must(&coord, h, &[]), 0.0, "{h} on a healthy run");
    }
    assert!(must(&coord, "dcgan_sample_pairwise_distance", &[("set", "real")]) > 0.0);
    assert!(must(&coord, "dcgan_sample_diversity_ratio", &[]) > 0.0);
    assert!(max_alive <= 2.0);

    // Worker rank 0 lingers after finishing: its own series.
    let waddr = worker_metrics_addr(&run_dir, 0).expect("worker 0 logged its metrics address");
    let (worker, worker_body) = scrape(&waddr).expect("scrape worker 0");
    let r0 = [("rank", "0")];
    assert_eq!(must(&worker, "dcgan_worker_step", &r0), 8.0);
    assert_eq!(must(&worker, "dcgan_worker_steps_total", &r0), 8.0);
    // 100 samples, 2 epochs, 2 ranks with equal halves of every (even) global batch.
    assert_eq!(must(&worker, "dcgan_worker_images_total", &r0), 100.0);
    for (phase, key) in [("data", "data_seconds"), ("compute", "compute_seconds"), ("all_reduce", "all_reduce_seconds")]
    {
        let got = must(&worker, "dcgan_worker_step_phase_seconds", &[("rank", "0"), ("phase", phase)]);
        // metrics.jsonl holds the slowest rank's time.
        assert!(got >= 0.0 && got <= f(key) + 1e-12, "rank 0 {phase} {got} > max {}", f(key));
        assert_eq!(histogram_count(&worker, "dcgan_worker_step_phase_duration_seconds", &[("phase", phase)]), 8.0);
    }
    assert!(must(&worker, "dcgan_worker_images_per_second", &r0) > 0.0);
    // The epoch-0 upload is surely timed; the final one may still be returning to the worker.
    assert!(histogram_count(&worker, "dcgan_worker_checkpoint_upload_duration_seconds", &r0) >= 1.0);

    // After the workers exit the coordinator lingers too: the per-rank series and liveness
    // show the final state.
    let (final_scrape, final_body) = loop {
        assert!(Instant::now() < deadline, "no final liveness in time");
        let (s, body) = scrape(&addr).expect("scrape after the run");
        if value(&s, "dcgan_rank_step", &[("rank", "1")]) == Some(8.0) {
            break (s, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(must(&final_scrape, "dcgan_rank_step", &[("rank", "0")]), 8.0);
    assert_eq!(must(&final_scrape, "dcgan_workers_alive", &[]), 0.0, "every worker finished");
    assert!(must(&final_scrape, "dcgan_rank_heartbeat_age_seconds", &[("rank", "0")]) >= 0.0);

    running.wait(TIMEOUT).assert_success();

    // Every series the dashboard queries exists in what was scraped.
    let scraped: BTreeSet<String> =
        names(&coord_body).into_iter().chain(names(&worker_body)).chain(names(&final_body)).collect();
    let dashboard = repo_root().join("deploy/grafana/dashboards/dcgan.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).expect("dashboard JSON")).expect("dashboard parses");
    let queried = dashboard_metric_names(&json);
    assert!(queried.len() >= 10, "the dashboard queries too little: {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !scraped.contains(*n)).collect();
    assert!(missing.is_empty(), "the dashboard queries series no endpoint exports: {missing:?}\nscraped: {scraped:?}");
}

/// The `dcgan_*` names in every `expr` of the dashboard's panels.
fn dashboard_metric_names(v: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "expr" {
                        if let Some(e) = x.as_str() {
                            for token in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                                if token.starts_with("dcgan_") {
                                    out.insert(token.to_string());
                                }
                            }
                        }
                    } else {
                        walk(x, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

#[test]
fn deploy_observability_configs_parse() {
    let root = repo_root().join("deploy");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/dashboards/dcgan.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8), "dashboard panels");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    for file in [
        "grafana/provisioning/datasources/datasources.yaml",
        "grafana/provisioning/dashboards/dashboards.yaml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "otel/collector.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
        assert!(doc.is_mapping(), "{file} is not a mapping");
    }
    let collector: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("otel/collector.yaml")).expect("collector"))
            .expect("yaml");
    assert!(collector["receivers"]["otlp"]["protocols"]["grpc"].is_mapping(), "the collector receives OTLP/gRPC");
    assert!(collector["service"]["pipelines"]["traces"]["exporters"].is_sequence());
}

mod otlp {
    //! A minimal OTLP/gRPC trace receiver: the collector's `TraceService`, keeping every span.

    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};

    /// One received span, flattened.
    #[derive(Clone, Debug)]
    pub struct Got {
        pub service: String,
        pub name: String,
        pub trace_id: Vec<u8>,
        pub span_id: Vec<u8>,
        pub parent_span_id: Vec<u8>,
        pub attrs: Vec<(String, String)>,
    }

    impl Got {
        pub fn attr(&self, key: &str) -> Option<&str> {
            self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
        }
    }

    fn text(v: &Option<AnyValue>) -> String {
        match v.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            Some(any_value::Value::DoubleValue(d)) => d.to_string(),
            _ => String::new(),
        }
    }

    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<Got>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut got = self.0.lock().unwrap_or_else(|p| p.into_inner());
            for rs in request.into_inner().resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .map(|a| text(&a.value))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        got.push(Got {
                            service: service.clone(),
                            name: s.name.clone(),
                            trace_id: s.trace_id.clone(),
                            span_id: s.span_id.clone(),
                            parent_span_id: s.parent_span_id.clone(),
                            attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                        });
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    pub fn server(r: Receiver) -> TraceServiceServer<Receiver> {
        TraceServiceServer::new(r)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_every_ranks_spans_of_a_step() {
    let receiver = otlp::Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(otlp::server(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(
        small_run(2, &run_dir),
        &["--data-limit", "100", "--max-steps", "3", "--otlp-endpoint", &endpoint, "--log-format", "json"],
    );
    let finished = tokio::task::spawn_blocking(move || run_coordinator(&args, TIMEOUT)).await.expect("join");
    finished.assert_success();
    server.abort();

    let spans = receiver.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let run = spans
        .iter()
        .find(|s| s.service == "dcgan-coordinator" && s.name == "run")
        .unwrap_or_else(|| panic!("no coordinator run span among {} spans", spans.len()));
    // Step 2's spans on each rank, with their phases as children.
    let steps: Vec<&otlp::Got> = spans
        .iter()
        .filter(|s| s.service == "dcgan-worker" && s.name == "step" && s.attr("step") == Some("2"))
        .collect();
    let mut ranks: Vec<&str> = steps.iter().filter_map(|s| s.attr("rank")).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, ["0", "1"], "step 2's spans: {steps:?}");
    for s in &steps {
        assert_eq!(s.trace_id, run.trace_id, "rank {:?}'s step 2 is in the run's trace", s.attr("rank"));
        for phase in ["data", "compute"] {
            assert!(
                spans.iter().any(|c| c.name == phase && c.parent_span_id == s.span_id),
                "rank {:?} step 2 has no {phase} child",
                s.attr("rank")
            );
        }
    }
    // The worker's span hangs under the coordinator's run span (context from Join's metadata),
    // and the coordinator's RPC spans under the workers' (context in each request's metadata).
    assert!(spans.iter().any(|s| s.name == "worker" && s.parent_span_id == run.span_id));
    let reports: Vec<&otlp::Got> = spans
        .iter()
        .filter(|s| s.service == "dcgan-coordinator" && s.attr("method").is_some_and(|m| m.ends_with("/ReportStep")))
        .collect();
    assert!(!reports.is_empty(), "no ReportStep RPC spans");
    assert!(reports.iter().all(|r| r.trace_id == run.trace_id && r.attr("rank").is_some() && r.attr("step").is_some()));

    // JSON logs: each worker line is an object with the span's fields.
    let log = std::fs::read_to_string(run_dir.join("logs/worker-0.log")).expect("worker log");
    let line = log.lines().find(|l| l.contains("\"joined\"")).expect("a joined line");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["level"], "INFO", "{v}");
}
