//! The rendered overlays against the real binaries: flags and variables exist, ports and names
//! agree, and the cpu-smoke overlay's containers train to completion as local processes.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use deploy_checks::*;
use serde_yaml::Value;

fn is_true(v: &str) -> bool {
    matches!(v, "true" | "1" | "yes" | "on")
}

#[test]
fn manifests_pass_only_flags_and_variables_the_binaries_have() {
    if !kubectl_available("manifests_pass_only_flags_and_variables_the_binaries_have") {
        return;
    }
    let bins = binaries_dir();
    let helps: BTreeMap<&str, Help> =
        ["coordinator", "worker"].into_iter().map(|b| (b, Help::of(&bins.join(b)))).collect();
    for overlay in overlays() {
        let objects = render(&overlay);
        for (kind, name, binary) in [("Deployment", COORDINATOR, "coordinator"), ("Job", WORKERS, "worker")] {
            let c = container(find(&objects, kind, name), binary);
            let help = &helps[binary];
            let where_ = format!("{} {kind}/{name}", overlay.display());
            let args = args(c);
            assert!(
                args.iter().any(|a| a == binary
                    || a.lines().any(|l| {
                        let mut words = l.split_whitespace().skip_while(|w| *w == "exec");
                        words.next() == Some(binary)
                    })),
                "{where_}: the container does not run `{binary}`: {args:?}"
            );
            for arg in &args {
                let (flags, vars) = flags_and_vars(arg);
                for f in flags {
                    assert!(help.flags.contains(&f), "{where_}: `{binary} --help` has no flag {f}");
                }
                for v in vars {
                    assert!(help.envs.contains(&v), "{where_}: `{binary} --help` has no variable {v}");
                }
            }
            let env = environment(&objects, c);
            for var in env.keys().filter(|k| k.starts_with("DCGAN_")) {
                assert!(help.envs.contains(var), "{where_}: `{binary} --help` has no variable {var}");
            }
            assert!(env.keys().any(|k| k.starts_with("DCGAN_")), "{where_}: configured by no DCGAN_* variable");
        }
    }
}

#[test]
fn service_ports_and_names_agree_with_the_coordinator_and_the_workers() {
    if !kubectl_available("service_ports_and_names_agree_with_the_coordinator_and_the_workers") {
        return;
    }
    for overlay in overlays() {
        let o = overlay.display();
        let objects = render(&overlay);
        let service = find(&objects, "Service", SERVICE);
        let deployment = find(&objects, "Deployment", COORDINATOR);
        let job = find(&objects, "Job", WORKERS);
        let coordinator = container(deployment, "coordinator");
        let worker = container(job, "worker");
        let (cenv, wenv) = (environment(&objects, coordinator), environment(&objects, worker));

        // The Service selects the coordinator's pods.
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in service["spec"]["selector"].as_mapping().expect("a selector") {
            assert_eq!(
                &labels[k.as_str().unwrap()],
                v,
                "{o}: the Service's selector {k:?} misses the coordinator pods"
            );
        }
        let container_port = |name: &str| -> u64 {
            coordinator["ports"]
                .as_sequence()
                .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some(name)))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{o}: the coordinator container has no port named {name}"))
        };
        let service_port = |name: &str| -> (u64, u64) {
            let p = service["spec"]["ports"]
                .as_sequence()
                .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some(name)))
                .unwrap_or_else(|| panic!("{o}: the Service has no port named {name}"));
            let target = match &p["targetPort"] {
                Value::String(n) => container_port(n),
                Value::Number(n) => n.as_u64().unwrap(),
                _ => p["port"].as_u64().unwrap(),
            };
            (p["port"].as_u64().unwrap(), target)
        };

        // gRPC: worker address -> Service port -> container port -> the coordinator's --listen.
        let (grpc_port, grpc_target) = service_port("grpc");
        assert_eq!(grpc_target, 50051, "{o}: the gRPC port");
        let listen = literal(&cenv, "DCGAN_LISTEN");
        assert_eq!(u64::from(port_of(listen)), grpc_target, "{o}: DCGAN_LISTEN={listen} is not the Service's target");
        assert!(listen.starts_with("0.0.0.0:"), "{o}: DCGAN_LISTEN={listen} is not reachable from other pods");
        let address = literal(&wenv, "DCGAN_COORDINATOR");
        let host = host_of(address);
        assert!(
            host == SERVICE || host.starts_with(&format!("{SERVICE}.")),
            "{o}: DCGAN_COORDINATOR={address} does not name the Service {SERVICE}"
        );
        assert_eq!(
            u64::from(port_of(address)),
            grpc_port,
            "{o}: DCGAN_COORDINATOR={address} misses the Service's port"
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                coordinator[probe]["grpc"]["port"].as_u64(),
                Some(grpc_target),
                "{o}: {probe} is not gRPC on {grpc_target}"
            );
        }

        // Metrics: the Service's port, the containers' ports and the scrape annotations agree,
        // and each binary is told to serve them.
        let (_, metrics_target) = service_port("metrics");
        assert_eq!(metrics_target, 9090, "{o}: the metrics port");
        for (workload, c, env) in [(deployment, coordinator, &cenv), (job, worker, &wenv)] {
            let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
            if annotations["prometheus.io/scrape"].as_str() == Some("true") {
                let port: u64 = annotations["prometheus.io/port"].as_str().and_then(|p| p.parse().ok()).expect("port");
                assert!(
                    c["ports"].as_sequence().into_iter().flatten().any(|p| p["containerPort"].as_u64() == Some(port)),
                    "{o}: the scrape port {port} is not a container port of {:?}",
                    c["name"]
                );
                let metrics = literal(env, "DCGAN_METRICS_LISTEN");
                assert_eq!(
                    u64::from(port_of(metrics)),
                    port,
                    "{o}: DCGAN_METRICS_LISTEN={metrics} is not the scrape port"
                );
            }
        }

        // Workers: an Indexed Job with one pod per rank, each asking for its index as its rank.
        let spec = &job["spec"];
        assert_eq!(spec["completionMode"].as_str(), Some("Indexed"), "{o}");
        let workers: u64 = literal(&cenv, "DCGAN_WORKERS").parse().expect("DCGAN_WORKERS is a number");
        assert_eq!(spec["parallelism"].as_u64(), Some(workers), "{o}: parallelism != DCGAN_WORKERS");
        assert_eq!(spec["completions"].as_u64(), Some(workers), "{o}: completions != DCGAN_WORKERS");
        assert!(is_true(literal(&cenv, "DCGAN_EXTERNAL_WORKERS")), "{o}: the coordinator would launch its own workers");
        assert_eq!(
            wenv.get("DCGAN_RANK"),
            Some(&EnvSource::Field("metadata.annotations['batch.kubernetes.io/job-completion-index']".into())),
            "{o}: the rank hint is not the completion index"
        );
        assert_eq!(wenv.get("DCGAN_ADVERTISE_HOST"), Some(&EnvSource::Field("status.podIP".into())), "{o}");
    }
}

#[test]
fn cpu_smoke_overlay_trains_to_completion_as_local_processes() {
    if !kubectl_available("cpu_smoke_overlay_trains_to_completion_as_local_processes") {
        return;
    }
    let pods = Pods::render("cpu-smoke", &[], &[]);
    let mut procs = vec![pods.coordinator("coordinator")];
    let addr = pods.address(&mut procs);
    procs.extend(pods.workers(&addr, ""));
    wait_all(&mut procs, Duration::from_secs(300)).unwrap_or_else(|e| panic!("the cpu-smoke dry run failed: {e}"));

    // The run is complete and stored.
    let (run_dir, cenv) = (&pods.run_dir, &pods.cenv);
    assert!(run_dir.join("COMPLETE").is_file(), "the coordinator did not mark the run complete");
    let limit: usize = cenv["DCGAN_DATA_LIMIT"].parse().unwrap();
    let batch: usize = cenv["DCGAN_BATCH_SIZE"].parse().unwrap();
    let epochs: usize = cenv["DCGAN_EPOCHS"].parse().unwrap();
    assert_eq!(pods.metrics_steps().len(), limit / batch * epochs, "metrics.jsonl lines");
    let checkpoints = std::fs::read_dir(run_dir.join("checkpoints")).unwrap().count();
    assert!(checkpoints > 0, "no checkpoint stored");
    assert!(run_dir.join("samples/real.png").is_file(), "no samples/real.png");

    // A restarted coordinator pod finds the run complete and exits 0 without touching it.
    let mut again = vec![pods.coordinator("coordinator-restarted")];
    wait_all(&mut again, Duration::from_secs(30)).unwrap_or_else(|e| panic!("restart after completion: {e}"));
}

/// `kubectl delete` of a running cpu-smoke run, as its pods see it: SIGTERM to every container.
/// Each exits 143 well within its terminationGracePeriodSeconds, the stop's checkpoint is the
/// last step in metrics.jsonl, and the pods started again (the coordinator's script resumes)
/// finish the run with every step exactly once.
#[test]
fn cpu_smoke_overlay_stops_on_sigterm_within_the_grace_period_and_resumes() {
    if !kubectl_available("cpu_smoke_overlay_stops_on_sigterm_within_the_grace_period_and_resumes") {
        return;
    }
    // More epochs than the overlay's one, so that there is a run to stop.
    let pods = Pods::render("cpu-smoke", &[("DCGAN_EPOCHS", "400")], &[]);
    let grace = {
        let objects = render(&repo_root().join("deploy/k8s/overlays/cpu-smoke"));
        let seconds = |kind, name| {
            find(&objects, kind, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30)
        };
        Duration::from_secs(seconds("Deployment", COORDINATOR).min(seconds("Job", WORKERS)))
    };
    let mut procs = vec![pods.coordinator("coordinator")];
    let addr = pods.address(&mut procs);
    procs.extend(pods.workers(&addr, ""));
    let start = Instant::now();
    while pods.metrics_steps().len() < 3 {
        if let Err(e) = wait_all_if_exited(&mut procs) {
            panic!("{e}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the run did not start training");
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &procs {
        let ok = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
    let signalled = Instant::now();
    for p in procs.iter_mut() {
        let status = loop {
            if let Some(s) = p.child.try_wait().expect("wait") {
                break s;
            }
            assert!(signalled.elapsed() < grace, "{} still running after the grace period", p.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert_eq!(status.code(), Some(143), "{} after SIGTERM:\n{log}", p.name);
    }
    let steps = pods.metrics_steps();
    let k = *steps.last().expect("steps");
    assert_eq!(steps, (1..=k).collect::<Vec<_>>());
    let latest = std::fs::read_dir(pods.run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step_").and_then(|s| s.parse::<u64>().ok()))
        .max();
    assert_eq!(latest, Some(k), "the stop's checkpoint is the last reported step");
    assert!(!pods.run_dir.join("COMPLETE").exists());

    // The pods come back (the coordinator with DCGAN_MAX_STEPS raised just enough to end soon);
    // the coordinator's script sees the checkpoints and resumes.
    let mut pods = pods;
    pods.cenv.insert("DCGAN_MAX_STEPS".into(), (k + 2).to_string());
    std::fs::remove_file(pods.run_dir.join("coordinator.addr")).expect("the stopped run's address file");
    let mut procs = vec![pods.coordinator("coordinator-restarted")];
    let addr = pods.address(&mut procs);
    procs.extend(pods.workers(&addr, "-restarted"));
    wait_all(&mut procs, Duration::from_secs(300)).unwrap_or_else(|e| panic!("the resumed run failed: {e}"));
    assert_eq!(pods.metrics_steps(), (1..=k + 2).collect::<Vec<_>>(), "every step once after the restart");
    assert!(pods.run_dir.join("COMPLETE").is_file());
}
