//! A network partition, not a death: one worker's packets are dropped (its network namespace's
//! link taken down) while its process runs on. The coordinator treats its silence as a death
//! after `--heartbeat-timeout` and starts a new generation; the others rejoin and wait for it.
//! When the link comes back, the partitioned worker is told that its generation is over, leaves
//! the old ring, rejoins, and the run finishes with all three and every step once.
//!
//! The namespace and its veth pair are made here with `ip` (the test needs root, as CI has).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(600);

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// A network namespace joined to the host by a veth pair, removed however the test ends.
struct Namespace {
    name: String,
    host_link: String,
    inner_link: String,
}

impl Namespace {
    /// `host_ip` on the host's end, `inner_ip` inside, both in a /24.
    fn create(tag: &str, host_ip: &str, inner_ip: &str) -> Self {
        let ns =
            Namespace { name: format!("dcgan-{tag}"), host_link: format!("dh{tag}"), inner_link: format!("di{tag}") };
        assert!(
            ip(&["netns", "add", &ns.name]),
            "cannot create network namespace {} (this test needs root and iproute2, as CI has)",
            ns.name
        );
        let (host_cidr, inner_cidr) = (format!("{host_ip}/24"), format!("{inner_ip}/24"));
        for args in [
            &["link", "add", &ns.host_link, "type", "veth", "peer", "name", &ns.inner_link][..],
            &["link", "set", &ns.inner_link, "netns", &ns.name],
            &["addr", "add", &host_cidr, "dev", &ns.host_link],
            &["link", "set", &ns.host_link, "up"],
            &["-n", &ns.name, "addr", "add", &inner_cidr, "dev", &ns.inner_link],
            &["-n", &ns.name, "link", "set", &ns.inner_link, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ] {
            assert!(ip(args), "ip {}", args.join(" "));
        }
        ns
    }

    /// Drops every packet between the namespace and the host (or lets them through again).
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(ip(&["-n", &self.name, "link", "set", &self.inner_link, state]));
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_link]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[test]
fn a_partitioned_worker_is_dropped_then_rejoins_when_the_network_heals() {
    let tag = format!("{}", std::process::id() % 100_000);
    let octet = 16 + std::process::id() % 200;
    let (host_ip, inner_ip) = (format!("10.213.{octet}.1"), format!("10.213.{octet}.2"));
    let ns = Namespace::create(&tag, &host_ip, &inner_ip);

    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let listen = format!("{host_ip}:{}", free_port(&host_ip));
    let args = watchable_run(
        3,
        &run_dir,
        240,
        5,
        &["--external-workers", "--listen", &listen, "--checkpoint-every", "5", "--heartbeat-timeout", "3"],
    );
    let total = 50u64;
    let coordinator = Running::start(&args, &run_dir);
    let url = coordinator.url();
    let logs: Vec<_> = (0..3).map(|r| tmp.path().join(format!("worker-{r}.log"))).collect();
    let netns_exec = ["ip", "netns", "exec", ns.name.as_str()];
    let mut workers: Vec<_> = (0..3)
        .map(|r| {
            let (prefix, host) =
                if r == 2 { (&netns_exec[..], inner_ip.as_str()) } else { (&[][..], host_ip.as_str()) };
            let rank = r.to_string();
            spawn_worker(prefix, &url, &["--rank", &rank, "--listen-host", host, "--rejoin-timeout", "120"], &logs[r])
        })
        .collect();

    let first = wait_for(TIMEOUT, "three workers training", || {
        (steps_done(&run_dir) >= 8).then(|| status(&url).filter(|s| s.world_size == 3))?
    });
    ns.set_link(false);
    let cut = Instant::now();
    let step_at_cut = steps_done(&run_dir);
    // Dropped after the heartbeat timeout: a new generation waits for all three again.
    let s = wait_for(TIMEOUT, "the partitioned worker dropped", || {
        status(&url).filter(|s| s.generation > first.generation)
    });
    eprintln!(
        "link down at step {step_at_cut}; generation {} began {:.1} s later",
        s.generation,
        cut.elapsed().as_secs_f64()
    );
    assert!(workers[2].try_wait().expect("try_wait").is_none(), "the partitioned worker's process is alive");
    std::thread::sleep(Duration::from_secs(3));
    assert!(steps_done(&run_dir) <= step_at_cut, "no training without the third worker (no --min-workers)");

    ns.set_link(true);
    let healed = Instant::now();
    let s = wait_for(TIMEOUT, "training again with all three", || {
        status(&url).filter(|s| s.world_size == 3 && s.generation > first.generation && s.step > step_at_cut)
    });
    eprintln!(
        "link up: training again with all three in generation {} after {:.1} s",
        s.generation,
        healed.elapsed().as_secs_f64()
    );

    let f = coordinator.wait(TIMEOUT);
    f.assert_success();
    for r in 0..3 {
        let st = wait_worker(&mut workers[r], Duration::from_secs(60), &logs[r]);
        assert!(st.success(), "rank {r} exited {st}:\n{}", std::fs::read_to_string(&logs[r]).unwrap());
    }
    let log = std::fs::read_to_string(&logs[2]).unwrap();
    // It learns it from the coordinator (a heartbeat refused) or from its ring (peers gone),
    // whichever comes first once packets flow again; either way it rejoins.
    assert!(log.contains("rejoining"), "the partitioned worker left its old generation:\n{log}");
    let rejoined = format!("joined rank=2 world=3 run={} generation={}", first.run_id, s.generation);
    assert!(log.contains(&rejoined), "the partitioned worker rejoined ({rejoined}):\n{log}");
    let steps: Vec<u64> = metrics(&run_dir).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "every step once in metrics.jsonl");
}
