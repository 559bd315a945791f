//! The worker binary's edges: its help, and clear errors when it cannot start. (Having an
//! integration test also makes `cargo test` build the `worker` binary the coordinator's
//! end-to-end tests launch.)

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn help_explains_the_flags() {
    let out = worker().arg("--help").output().expect("run worker --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--coordinator", "--threads", "--listen-host", "--data", "--rank", "[env: DCGAN_COORDINATOR="] {
        assert!(text.contains(flag), "help lacks {flag}:\n{text}");
    }
}

/// The coordinator's names for the same settings work here too (one env variable, one flag
/// name), and `--help` ends with the exit codes.
#[test]
fn the_coordinators_flag_names_work_and_help_gives_the_exit_codes() {
    let out = worker().arg("--help").output().expect("run worker --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["--worker-threads", "--worker-data", "Exit status:", "143"] {
        assert!(text.contains(needle), "help lacks {needle}:\n{text}");
    }
    // Parsed as the same flags: a value --worker-data cannot take is refused as --data's.
    let out = worker()
        .args(["--coordinator", "http://127.0.0.1:1", "--worker-threads", "1", "--worker-data", "mnist:/x"])
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unreachable_coordinator_is_reported() {
    // Port 1 on loopback: nothing listens there.
    let out =
        worker().args(["--coordinator", "http://127.0.0.1:1", "--connect-timeout", "1"]).output().expect("run worker");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator at http://127.0.0.1:1"), "{err}");
}

#[test]
fn bad_flags_are_reported() {
    let out =
        worker().args(["--coordinator", "http://127.0.0.1:1", "--data", "mnist:/x"]).output().expect("run worker");
    // A value --data cannot take is a usage error, refused by the parser before anything starts.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'mnist:/x'") && err.contains("prepared:DIR or local:SPEC"), "{err}");

    // So is an address that is none of host:port, http://host:port, https://host:port.
    let out = worker().args(["--coordinator", "not a url"]).output().expect("run worker");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"not a url\" is not a coordinator address: the port is missing"), "{err}");
    assert!(err.contains("give host:port"), "{err}");
}
