//! Reading what `kubectl kustomize` renders for `deploy/k8s/overlays/*`, and what the real
//! binaries' `--help` says, so that the tests in `tests/` can hold one against the other.
//!
//! The tests need `kubectl` (kustomize is built in; no cluster). Without it they skip, saying
//! so. The binaries are built by the tests with cargo (a no-op when up to date).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// The repository's root (this crate lives in `deploy/checks`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The overlays under `deploy/k8s/overlays`, sorted by name.
pub fn overlays() -> Vec<PathBuf> {
    let dir = repo_root().join("deploy/k8s/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    found
}

/// Whether `kubectl` runs here; when not, prints why the caller skips.
pub fn kubectl_available(test: &str) -> bool {
    let ok = Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: kubectl (with kustomize built in) is not installed here");
    }
    ok
}

/// The objects `kubectl kustomize DIR` renders.
pub fn render(overlay: &Path) -> Vec<Value> {
    let out = Command::new("kubectl").arg("kustomize").arg(overlay).output().expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    text.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{d}")))
        .collect()
}

/// Builds `coordinator`, `worker` and `dcgan` with the profile of this test executable and returns the
/// directory that holds them. Every target of the workspace is asked for, as `cargo test
/// --workspace` builds them, so that the features resolve the same and nothing is recompiled.
pub fn binaries_dir() -> PathBuf {
    // target/<profile dir>/deps/<test executable>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => "release",
        _ => "test",
    };
    build_workspace(profile);
    for bin in ["coordinator", "worker", "dcgan"] {
        let p = dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
        assert!(p.is_file(), "no {bin} binary at {}", p.display());
    }
    dir
}

/// Builds every target of the workspace with cargo `profile` ("test" or "release"), as `cargo
/// test --workspace` builds them, so that the features resolve the same and, after that
/// command, nothing is recompiled. Shared with the coordinator's tests, which start the
/// binaries too.
pub fn build_workspace(profile: &str) {
    let mut cargo = Command::new(env!("CARGO"));
    for var in cargo_test_vars() {
        cargo.env_remove(var);
    }
    let status = cargo
        .args(["build", "--profile", profile, "--workspace", "--all-targets"])
        .current_dir(repo_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --workspace failed");
}

/// The variables cargo sets for a running test (its package's manifest dir, name, version),
/// which a nested `cargo build` must not inherit: build scripts such as ring's rerun when
/// `CARGO_MANIFEST_DIR` changes, so each test crate's value rebuilt half the dependencies.
fn cargo_test_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("CARGO_PKG_")
                || ["CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH", "CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"]
                    .contains(&k.as_ref())
        })
        .collect()
}

/// The long flags and `DCGAN_*` variables a binary's `--help` lists.
#[derive(Debug, Default)]
pub struct Help {
    pub flags: BTreeSet<String>,
    pub envs: BTreeSet<String>,
}

impl Help {
    pub fn of(binary: &Path) -> Self {
        Self::of_command(binary, &[])
    }

    /// The help of a subcommand: `binary SUBCOMMAND... --help` (`dcgan prepare --help`).
    pub fn of_command(binary: &Path, subcommand: &[&str]) -> Self {
        let out = Command::new(binary).args(subcommand).arg("--help").output().expect("run --help");
        assert!(out.status.success(), "{} {} --help failed", binary.display(), subcommand.join(" "));
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn parse(text: &str) -> Self {
        let mut help = Help::default();
        for line in text.lines() {
            let line = line.trim_start();
            if let Some(rest) = line.strip_prefix("[env: ") {
                // `[env: NAME=value]`, or `[env: NAME]` for a variable whose value is hidden.
                help.envs.insert(rest.split(['=', ']']).next().unwrap_or_default().to_string());
            }
            // Option lines: `-q, --quiet` or `--workers <WORKERS>` (whose description may
            // hold ", " too).
            let short = |s: &str| s.len() == 2 && s.starts_with('-') && s != "--";
            let line = line.split_once(", ").filter(|(s, _)| short(s)).map_or(line, |(_, l)| l);
            if let Some(flag) = line.strip_prefix("--") {
                let name: String = flag.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                help.flags.insert(format!("--{name}"));
            }
        }
        help
    }
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// The pod template's only container of a Deployment or Job.
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no container {name} in {:?}", workload["metadata"]["name"]))
}

/// The pod template's init containers of a Deployment or Job.
pub fn init_containers(workload: &Value) -> Vec<&Value> {
    workload["spec"]["template"]["spec"]["initContainers"].as_sequence().map(|s| s.iter().collect()).unwrap_or_default()
}

/// How a path inside a container is stored: the volume mounted at the longest `mountPath`
/// that holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Mounted {
    pub mount_path: String,
    pub volume: String,
    /// `persistentVolumeClaim.claimName`, for a claim.
    pub claim: Option<String>,
    pub sub_path: Option<String>,
    /// The mount's `readOnly`, or the claim's.
    pub read_only: bool,
}

/// The volume that holds the absolute `path` in `container` of `workload`'s pods, if any.
pub fn mount_of(workload: &Value, container: &Value, path: &str) -> Option<Mounted> {
    let mount = container["volumeMounts"]
        .as_sequence()?
        .iter()
        .filter(|m| m["mountPath"].as_str().is_some_and(|p| path_is_under(path, p)))
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))?;
    let name = mount["name"].as_str().expect("a mount names its volume");
    let volume = workload["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .and_then(|vs| vs.iter().find(|v| v["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("{:?} mounts {name}, which is no volume of its pod", container["name"]));
    let claim = &volume["persistentVolumeClaim"];
    Some(Mounted {
        mount_path: mount["mountPath"].as_str().unwrap_or_default().to_string(),
        volume: name.to_string(),
        claim: claim["claimName"].as_str().map(str::to_string),
        sub_path: mount["subPath"].as_str().map(str::to_string),
        read_only: mount["readOnly"].as_bool() == Some(true) || claim["readOnly"].as_bool() == Some(true),
    })
}

/// Whether the absolute `path` is `dir` or inside it.
pub fn path_is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || dir.is_empty() || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// The value given to `flag` in `args`: `--flag VALUE` or `--flag=VALUE`.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag).and_then(|r| r.strip_prefix('='))
        }
    })
}

/// The names `$(NAME)` refers to in a container's `args`, which Kubernetes replaces with the
/// container's environment variables.
pub fn references(arg: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            names.push(rest[..end].to_string());
            rest = &rest[end + 1..];
        }
    }
    names
}

/// Kubernetes' expansion of `$(NAME)` in `args` from the container's environment (a name it
/// does not define stays as written, as in Kubernetes).
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')').and_then(|end| env.get(&after[..end]).map(|v| (end, v))) {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A container's `args` as strings.
pub fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .map(|s| s.iter().map(|a| a.as_str().expect("args are strings").to_string()).collect())
        .unwrap_or_default()
}

/// Where an environment variable's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvSource {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath`
    Field(String),
    /// `valueFrom.resourceFieldRef.resource`
    Resource(String),
}

/// A container's environment: `envFrom` ConfigMaps and Secrets (looked up among `objects`;
/// Secrets as written in the repo, with `stringData`), then `env`.
pub fn environment(objects: &[Value], container: &Value) -> BTreeMap<String, EnvSource> {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_sequence().into_iter().flatten() {
        let (map, values) = if let Some(name) = from["configMapRef"]["name"].as_str() {
            (find(objects, "ConfigMap", name), "data")
        } else if let Some(name) = from["secretRef"]["name"].as_str() {
            (find(objects, "Secret", name), "stringData")
        } else {
            panic!("envFrom with a source these checks do not know: {from:?}")
        };
        for (k, v) in map[values].as_mapping().into_iter().flatten() {
            let k = k.as_str().expect("keys are strings").to_string();
            env.insert(k, EnvSource::Literal(v.as_str().expect("values are strings").to_string()));
        }
    }
    for e in container["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_string();
        let source = if let Some(v) = e["value"].as_str() {
            EnvSource::Literal(v.to_string())
        } else if let Some(p) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            EnvSource::Field(p.to_string())
        } else if let Some(r) = e["valueFrom"]["resourceFieldRef"]["resource"].as_str() {
            EnvSource::Resource(r.to_string())
        } else {
            panic!("env {name}: a value source these checks do not know: {e:?}")
        };
        env.insert(name, source);
    }
    env
}

/// A literal variable's value.
pub fn literal<'a>(env: &'a BTreeMap<String, EnvSource>, name: &str) -> &'a str {
    match env.get(name) {
        Some(EnvSource::Literal(v)) => v,
        other => panic!("{name} should be a literal value, is {other:?}"),
    }
}

/// The words of `text` that look like long flags (`--name`) or `DCGAN_*` variables.
pub fn flags_and_vars(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut flags, mut vars) = (BTreeSet::new(), BTreeSet::new());
    let mut rest = text;
    while let Some(i) = rest.find("--") {
        let name: String = rest[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{name}"));
        }
        rest = &rest[i + 2..];
    }
    let mut rest = text;
    while let Some(i) = rest.find("DCGAN_") {
        let name: String =
            rest[i..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
        vars.insert(name);
        rest = &rest[i + 6..];
    }
    (flags, vars)
}

/// The port of `host:port` or `scheme://host:port`.
pub fn port_of(addr: &str) -> u16 {
    let host_port = addr.split_once("://").map_or(addr, |(_, r)| r).trim_end_matches('/');
    let (_, port) = host_port.rsplit_once(':').unwrap_or_else(|| panic!("{addr} has no port"));
    port.parse().unwrap_or_else(|_| panic!("{addr}: bad port"))
}

/// The host of `scheme://host:port`.
pub fn host_of(url: &str) -> &str {
    let host_port = url.split_once("://").map_or(url, |(_, r)| r);
    host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lines_and_script_words() {
        let h = Help::parse(
            "  -q, --quiet\n          [env: DCGAN_QUIET=]\n      --run-dir <RUN_DIR>\n          [env: DCGAN_TOKEN]\n      --source <SOURCE>  `a:PATH`, `b:PATH`\n",
        );
        assert_eq!(h.flags, BTreeSet::from(["--quiet".to_string(), "--run-dir".to_string(), "--source".to_string()]));
        assert_eq!(h.envs, BTreeSet::from(["DCGAN_QUIET".to_string(), "DCGAN_TOKEN".to_string()]));
        let (f, v) = flags_and_vars("x=\"$DCGAN_RUN_DIR\"; coordinator --resume -- ; export DCGAN_RESUME=true");
        assert_eq!(f, BTreeSet::from(["--resume".to_string()]));
        assert_eq!(v, BTreeSet::from(["DCGAN_RESUME".to_string(), "DCGAN_RUN_DIR".to_string()]));
        assert_eq!(port_of("http://dcgan-coordinator:50051"), 50051);
        assert_eq!(host_of("http://dcgan-coordinator:50051"), "dcgan-coordinator");
        assert_eq!(port_of("0.0.0.0:9090"), 9090);
    }

    #[test]
    fn flag_values_references_and_paths() {
        let args: Vec<String> =
            ["dcgan", "prepare", "--out", "/data/p", "--image-size=64", "--threads", "$(N)"].map(String::from).into();
        assert_eq!(flag_value(&args, "--out"), Some("/data/p"));
        assert_eq!(flag_value(&args, "--image-size"), Some("64"));
        assert_eq!(flag_value(&args, "--image"), None);
        assert_eq!(references("$(N) and $(M)x"), ["N", "M"]);
        let env = BTreeMap::from([("N".to_string(), "8".to_string())]);
        assert_eq!(expand("--threads=$(N) $(M)", &env), "--threads=8 $(M)");
        assert!(path_is_under("/data/prepared/x", "/data"));
        assert!(path_is_under("/data", "/data/"));
        assert!(!path_is_under("/database", "/data"));
    }
}
