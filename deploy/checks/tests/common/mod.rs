//! Running an overlay's containers as processes here: their exact args and environment from
//! the rendered YAML, with the Service's name replaced by 127.0.0.1, the listening ports by free
//! ones, the volumes' paths by a temporary directory and the downward-API values (rank, pod IP,
//! CPU limit) by what Kubernetes would fill in.

// Each test executable uses a part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_checks::*;
use serde_yaml::Value;

pub const COORDINATOR: &str = "dcgan-coordinator";
pub const WORKERS: &str = "dcgan-workers";
pub const SERVICE: &str = "dcgan-coordinator";

/// Where the base mounts the coordinator's run volume (under the image user's home).
const RUN_ROOT: &str = "/var/lib/dcgan";

/// A process of a dry run with its output in a file, so a failure can show it.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn spawn(name: &str, args: &[String], env: &BTreeMap<String, String>, path: &str, logs: &Path) -> Proc {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("create log");
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
    for (k, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("DCGAN_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env).env("PATH", path);
    Proc { name: name.to_string(), child: cmd.spawn().unwrap_or_else(|e| panic!("start {name} ({args:?}): {e}")), log }
}

/// Waits until every process has exited, one has failed, or `limit` has passed; then kills
/// what still runs. Err (with every log) unless all exited 0.
pub fn wait_all(procs: &mut [Proc], limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut failed = None;
    loop {
        let mut running = false;
        for p in procs.iter_mut() {
            match p.child.try_wait().expect("wait") {
                Some(s) if !s.success() && failed.is_none() => {
                    failed = Some(format!("{} exited with {s}", p.name));
                }
                Some(_) => {}
                None => running = true,
            }
        }
        if failed.is_some() || !running || start.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let timed_out = procs.iter_mut().any(|p| p.child.try_wait().ok().flatten().is_none());
    for p in procs.iter_mut() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    match (failed, timed_out) {
        (None, false) => Ok(()),
        (f, _) => {
            let logs: String = procs.iter().map(|p| format!("--- {}:\n{}\n", p.name, p.output())).collect();
            Err(format!("{}\n{logs}", f.unwrap_or_else(|| format!("not done after {limit:?}"))))
        }
    }
}

/// Fails with the logs when a process of the dry run has already failed.
pub fn wait_all_if_exited(procs: &mut [Proc]) -> Result<(), String> {
    if procs.iter_mut().any(|p| p.child.try_wait().ok().flatten().is_some_and(|s| !s.success())) {
        return wait_all(procs, Duration::ZERO);
    }
    Ok(())
}

/// An overlay's coordinator and worker containers, ready to run as processes here.
pub struct Pods {
    pub tmp: tempfile::TempDir,
    pub path: String,
    pub objects: Vec<Value>,
    pub run_dir: PathBuf,
    pub cargs: Vec<String>,
    pub cenv: BTreeMap<String, String>,
    pub wargs: Vec<String>,
    /// Each rank's environment, but for the coordinator's address (known once it listens).
    pub wenvs: Vec<BTreeMap<String, String>>,
    /// Mount paths and where they are here, longest first.
    roots: Vec<(String, PathBuf)>,
}

impl Pods {
    /// The containers of `deploy/k8s/overlays/<overlay>`. `coordinator_env` and `worker_env`
    /// set variables (each one its binary's `--help` lists): a longer or a smaller run than
    /// the overlay's. One worker runs per `DCGAN_WORKERS`.
    pub fn render(overlay: &str, coordinator_env: &[(&str, &str)], worker_env: &[(&str, &str)]) -> Self {
        let bins = binaries_dir();
        let objects = render(&repo_root().join("deploy/k8s/overlays").join(overlay));
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap_or_default());

        // The run volume's paths go to the temporary directory itself (as they always did);
        // every other volume's mount path M to TMP/M, the same in every pod of the overlay.
        let mut roots = vec![(RUN_ROOT.to_string(), tmp.path().to_path_buf())];
        for w in objects.iter().filter(|o| o["spec"]["template"]["spec"].is_mapping()) {
            let spec = &w["spec"]["template"]["spec"];
            for c in spec["containers"].as_sequence().into_iter().chain(spec["initContainers"].as_sequence()).flatten()
            {
                for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                    let p = m["mountPath"].as_str().expect("mountPath").trim_end_matches('/');
                    if p != "/tmp" && !path_is_under(p, RUN_ROOT) && !roots.iter().any(|(r, _)| r == p) {
                        roots.push((p.to_string(), tmp.path().join(p.trim_start_matches('/'))));
                    }
                }
            }
        }
        roots.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));

        let mut pods = Pods {
            tmp,
            path,
            objects,
            run_dir: PathBuf::new(),
            cargs: Vec::new(),
            cenv: BTreeMap::new(),
            wargs: Vec::new(),
            wenvs: Vec::new(),
            roots,
        };
        let set = |env: &mut BTreeMap<String, String>, binary: &str, vars: &[(&str, &str)]| {
            let help = Help::of(&bins.join(binary));
            for (k, v) in vars {
                assert!(help.envs.contains(*k), "`{binary} --help` has no variable {k}");
                env.insert(k.to_string(), v.to_string());
            }
        };

        let deployment = find(&pods.objects, "Deployment", COORDINATOR).clone();
        let c = container(&deployment, "coordinator");
        let (cargs, mut cenv) = pods.command(c, 0);
        set(&mut cenv, "coordinator", coordinator_env);
        pods.run_dir = PathBuf::from(&cenv["DCGAN_RUN_DIR"]);
        pods.create_mounts(c);

        let job = find(&pods.objects, "Job", WORKERS).clone();
        let w = container(&job, "worker");
        let workers: u64 = cenv["DCGAN_WORKERS"].parse().expect("DCGAN_WORKERS");
        pods.create_mounts(w);
        let wargs = pods.command(w, 0).0;
        pods.wenvs = (0..workers)
            .map(|index| {
                let mut env = pods.command(w, index).1;
                set(&mut env, "worker", worker_env);
                env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
                env
            })
            .collect();
        pods.cargs = cargs;
        pods.cenv = cenv;
        pods.wargs = wargs;
        pods
    }

    /// `text` with the pods' volume paths replaced by where they are here, and a listening
    /// address `0.0.0.0:PORT` by `127.0.0.1:0`.
    pub fn local(&self, text: &str) -> String {
        if text.starts_with("0.0.0.0:") {
            return "127.0.0.1:0".to_string();
        }
        let mut out = String::new();
        let mut i = 0;
        'text: while i < text.len() {
            let before = text[..i].chars().next_back();
            if before.is_none_or(|c| !(c.is_alphanumeric() || "._-/".contains(c))) {
                for (root, here) in &self.roots {
                    if let Some(rest) = text[i..].strip_prefix(root.as_str()) {
                        if rest.chars().next().is_none_or(|c| !(c.is_alphanumeric() || "._-".contains(c))) {
                            out.push_str(&here.display().to_string());
                            i += root.len();
                            continue 'text;
                        }
                    }
                }
            }
            let c = text[i..].chars().next().expect("a char");
            out.push(c);
            i += c.len_utf8();
        }
        out
    }

    /// A container's args and environment here, as the pod with completion index `index`
    /// would run it (`$(NAME)` in args expanded as Kubernetes does).
    pub fn command(&self, c: &Value, index: u64) -> (Vec<String>, BTreeMap<String, String>) {
        let env: BTreeMap<String, String> = environment(&self.objects, c)
            .into_iter()
            .map(|(k, v)| {
                let value = match v {
                    EnvSource::Literal(v) if k == "DCGAN_COORDINATOR" => {
                        assert_eq!(host_of(&v), SERVICE, "the workers' coordinator address");
                        v
                    }
                    EnvSource::Literal(v) => self.local(&v),
                    EnvSource::Field(f) if f.contains("job-completion-index") => index.to_string(),
                    EnvSource::Field(f) if f == "status.podIP" => "127.0.0.1".to_string(),
                    EnvSource::Resource(r) if r == "limits.cpu" => "1".to_string(),
                    other => panic!("{:?} env {k}: {other:?} has no local stand-in", c["name"]),
                };
                (k, value)
            })
            .collect();
        let args = args(c).iter().map(|a| self.local(&expand(a, &env))).collect();
        (args, env)
    }

    /// Creates where a container's volumes are mounted, here.
    pub fn create_mounts(&self, c: &Value) {
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            std::fs::create_dir_all(self.local(m["mountPath"].as_str().unwrap())).unwrap();
        }
    }

    /// Starts any container of the overlay, as the pod with completion index 0 would.
    pub fn start(&self, name: &str, c: &Value) -> Proc {
        self.create_mounts(c);
        let (args, env) = self.command(c, 0);
        spawn(name, &args, &env, &self.path, self.tmp.path())
    }

    pub fn coordinator(&self, name: &str) -> Proc {
        spawn(name, &self.cargs, &self.cenv, &self.path, self.tmp.path())
    }

    /// Waits for the coordinator's bound address (port 0 here, 50051 in the pod).
    pub fn address(&self, procs: &mut [Proc]) -> String {
        let addr_file = self.run_dir.join("coordinator.addr");
        let start = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if a.ends_with('\n') {
                    return a.trim().to_string();
                }
            }
            if let Err(e) = wait_all_if_exited(procs) {
                panic!("{e}");
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no {} after 2 minutes", addr_file.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One process per completion index, told the coordinator's local address.
    pub fn workers(&self, addr: &str, suffix: &str) -> Vec<Proc> {
        self.wenvs
            .iter()
            .enumerate()
            .map(|(index, env)| {
                let mut env = env.clone();
                env.insert("DCGAN_COORDINATOR".into(), format!("http://{addr}"));
                spawn(&format!("worker-{index}{suffix}"), &self.wargs, &env, &self.path, self.tmp.path())
            })
            .collect()
    }

    pub fn metrics_steps(&self) -> Vec<u64> {
        std::fs::read_to_string(self.run_dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["step"].as_u64().expect("step"))
            .collect()
    }
}
