#!/usr/bin/env python3
"""Memory of a run against the size of its prepared data set: the coordinator and its launched
workers should hold the same resident memory whatever the number of samples (workers read their
samples from the shards with pread; the coordinator never holds pixels).

    cargo build --release -p coordinator -p worker -p dcgan-tool
    target/release/dcgan prepare --source folder:IMAGES --out PREPARED --image-size 64
    python3 bench/data_scale.py PREPARED_50K PREPARED_200K [--steps 150] [--repeats 2] [--json F] [--md F]

For each prepared directory it runs `coordinator --workers 2 --worker-threads 1 --dataset
prepared:DIR --image-size 64 --ngf 16 --ndf 16 --max-steps K` (a small model, so that the steps go
quickly and the data path is a larger share of each), and every --poll seconds reads VmRSS and
VmHWM from /proc/PID/status of the coordinator and of every process below it (workers found by
walking /proc for parent ids). A process's peak is the larger of its highest VmRSS sample and the
last VmHWM read before it exited; VmHWM is the kernel's high-water mark, so only a peak after the
last read could be missed, and from two steps before the end (metrics.jsonl holds K-2 steps; the
run then ends with its final checkpoint and exits) /proc is read every --final-poll seconds.

The sets run --repeats rounds, in alternating order; a set's figures are the medians over its
rounds (the range shows how much one run reads off another). Images/s is the median over
metrics.jsonl's steps after the first --skip; the wall time is the coordinator's, from launch to
exit. The ratio row is the largest set's over the smallest's.

Goal: every process's peak within 10% between the smallest and the largest set, and the
coordinator under 200 MB (10^6 bytes; 190.7 MiB).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
GOAL_RATIO = 0.10
GOAL_COORD_BYTES = 200e6


def status_kib(pid):
    """VmRSS and VmHWM of a live process, in KiB (None, None once it is gone)."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, hwm


def parent_map():
    """pid -> ppid of every process now in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the fields after it are plain.
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(name)] = int(fields[1])
    return out


def descendants(root, parents):
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def label(pid):
    """`worker rank N` for a worker (its --rank argument), else the program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    if "--rank" in argv:
        i = argv.index("--rank")
        if i + 1 < len(argv):
            return f"worker rank {argv[i + 1]}"
    return os.path.basename(argv[0])


def logged_steps(path):
    """Lines (steps) in a run's metrics.jsonl so far."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def manifest_count(d):
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    return m["count"], m["image_size"], m["channels"], sum(s["count"] for s in m["shards"]) * m["channels"] * m[
        "image_size"] ** 2


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_model():
    """The first CPU's model name, with its family and model numbers (VMs often give a generic name)."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def run_one(d, a, tmp):
    count, size, nc, set_bytes = manifest_count(d)
    run_dir = os.path.join(tmp, f"run-{os.path.basename(os.path.normpath(d))}")
    cmd = [a.coordinator, "--workers", str(a.workers), "--worker-threads", str(a.worker_threads),
           "--dataset", f"prepared:{os.path.abspath(d)}", "--image-size", str(a.image_size),
           "--batch-size", str(a.batch), "--ngf", str(a.ngf), "--ndf", str(a.ndf), "--max-steps", str(a.steps),
           "--epochs", "1000", "--run-dir", run_dir, "--listen", "127.0.0.1:0", "--quiet", "--checkpoint-every", "0"]
    log_path = os.path.join(tmp, f"coordinator-{os.path.basename(os.path.normpath(d))}.log")
    load_before = loadavg()
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peaks = {}  # pid -> {"label", "rss_max_kib", "hwm_kib", "samples"}

    def sample(pid, name):
        rss, hwm = status_kib(pid)
        if rss is None:
            return
        p = peaks.setdefault(pid, {"label": name, "rss_max_kib": 0, "hwm_kib": 0, "samples": 0})
        if p["label"] is None:
            p["label"] = name
        p["rss_max_kib"] = max(p["rss_max_kib"], rss)
        p["hwm_kib"] = max(p["hwm_kib"], hwm or 0)
        p["samples"] += 1

    metrics = os.path.join(run_dir, "metrics.jsonl")
    final_at = None  # when metrics.jsonl reached step K-2
    known = []
    while proc.poll() is None:
        sample(proc.pid, "coordinator")
        if final_at is None or not known:
            known = descendants(proc.pid, parent_map())
        for pid in known:
            sample(pid, peaks.get(pid, {}).get("label") or label(pid))
        if final_at is None and logged_steps(metrics) >= a.steps - 2:
            final_at = time.monotonic()
        # After the last step the run ends with its final checkpoint (rank 0 serialises the model,
        # the coordinator stores it) and exits within a fraction of a second: a peak there would
        # fall between two samples at --poll, so from two steps before the end /proc is read every
        # --final-poll (VmHWM keeps whatever came before).
        time.sleep(a.poll if final_at is None else a.final_poll)
    wall = time.monotonic() - t0
    load_after = loadavg()
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"coordinator failed ({proc.returncode}) on {d}:\n{' '.join(cmd)}\n{tail}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    steady = [l for l in lines if l["step"] > a.skip] or lines
    ips = [l["images_per_sec"] for l in steady if "images_per_sec" in l]
    procs = []
    for pid, p in sorted(peaks.items()):
        peak_kib = max(p["rss_max_kib"], p["hwm_kib"])
        procs.append({"pid": pid, "label": p["label"], "peak_rss_mib": peak_kib / 1024,
                      "rss_max_sampled_mib": p["rss_max_kib"] / 1024, "vm_hwm_mib": p["hwm_kib"] / 1024,
                      "samples": p["samples"]})
    return {
        "dir": os.path.abspath(d),
        "samples": count,
        "image_size": size,
        "channels": nc,
        "set_mib": set_bytes / 2 ** 20,
        "steps": len(lines),
        "wall_seconds": wall,
        "images_per_sec_median": statistics.median(ips) if ips else None,
        "data_seconds_median": statistics.median(l["data_seconds"] for l in steady) if steady else None,
        "step_images_total": sum(l.get("global_batch", a.batch) for l in lines),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        "processes": procs,
        "command": " ".join(cmd),
    }


def role_peaks(r):
    """Peak MiB by role: the coordinator, each worker rank (the largest, were a rank restarted)."""
    out = {}
    for p in r["processes"]:
        if p["label"] is None:
            continue
        out[p["label"]] = max(out.get(p["label"], 0.0), p["peak_rss_mib"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="prepared directories (made by `dcgan prepare`)")
    ap.add_argument("--coordinator", default=os.path.join(BIN, "coordinator"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--ndf", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip", type=int, default=10, help="steps left out of the images/s median")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between /proc samples")
    ap.add_argument("--final-poll", type=float, default=0.005,
                    help="seconds between samples over the last two steps and the final checkpoint")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the sets (order alternating)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--md", help="write the markdown table here")
    a = ap.parse_args()

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs = {d: [] for d in a.dirs}
    with tempfile.TemporaryDirectory(prefix="data_scale-") as tmp:
        for rnd in range(a.repeats):
            # Alternate the order, so that neither set always runs first (on a warmer or quieter machine).
            round_dir = os.path.join(tmp, f"round{rnd}")
            os.makedirs(round_dir)
            for d in (a.dirs if rnd % 2 == 0 else a.dirs[::-1]):
                r = run_one(d, a, round_dir)
                r["round"] = rnd
                runs[d].append(r)
                print(f"round {rnd} {d}: {r['samples']} samples, {r['wall_seconds']:.1f} s, "
                      f"{r['images_per_sec_median'] or float('nan'):.1f} img/s, "
                      + ", ".join(f"{k} {v:.1f} MiB" for k, v in sorted(role_peaks(r).items())), file=sys.stderr)

    # Per set: each role's peak, median over the rounds (and its range).
    sets = []
    for d in a.dirs:
        rs = runs[d]
        roles = sorted({k for r in rs for k in role_peaks(r)})
        peaks = {k: [role_peaks(r)[k] for r in rs if k in role_peaks(r)] for k in roles}
        ips = [r["images_per_sec_median"] for r in rs if r["images_per_sec_median"] is not None]
        ds = [r["data_seconds_median"] for r in rs if r["data_seconds_median"] is not None]
        sets.append({
            "dir": rs[0]["dir"], "samples": rs[0]["samples"], "set_mib": rs[0]["set_mib"],
            "peak_rss_mib_median": {k: statistics.median(v) for k, v in peaks.items()},
            "peak_rss_mib_range": {k: [min(v), max(v)] for k, v in peaks.items()},
            "images_per_sec_median": statistics.median(ips) if ips else None,
            "images_per_sec_runs": ips,
            "data_seconds_median": statistics.median(ds) if ds else None,
            "wall_seconds_median": statistics.median(r["wall_seconds"] for r in rs),
            "loadavg_1m": [[r["loadavg_1m_before"], r["loadavg_1m_after"]] for r in rs],
        })
    by_size = sorted(sets, key=lambda x: x["samples"])
    small, large = by_size[0], by_size[-1]
    ps, pl = small["peak_rss_mib_median"], large["peak_rss_mib_median"]
    ratios = {k: pl[k] / ps[k] for k in sorted(ps) if k in pl and ps[k] > 0}
    coord_max = max(max(r["peak_rss_mib_range"].get("coordinator", [0.0, 0.0])) for r in sets)
    within = all(abs(v - 1) <= GOAL_RATIO for v in ratios.values()) if ratios else None
    coord_ok = coord_max * 2 ** 20 < GOAL_COORD_BYTES
    summary = {
        "program": "data_scale",
        "date_utc": started,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "settings": {k: getattr(a, k) for k in ("workers", "worker_threads", "image_size", "batch", "ngf", "ndf",
                                                  "steps", "skip", "poll", "final_poll", "repeats")},
        "sets": sets,
        "ratio_of": f"{large['samples']} / {small['samples']} samples (medians over rounds)",
        "peak_ratio_large_over_small": ratios,
        "goal_within_10pct": within,
        "coordinator_peak_mib_max": coord_max,
        "goal_coordinator_under_200mb": coord_ok,
        "runs": [r for d in a.dirs for r in runs[d]],
    }

    roles = sorted({k for x in sets for k in x["peak_rss_mib_median"]}, key=lambda k: (k != "coordinator", k))
    md = [f"data_scale, {started}, {summary['cpu_model']} ({summary['cpus']} CPUs): {a.workers} workers x "
          f"{a.worker_threads} thread, {a.image_size}x{a.image_size}, batch {a.batch}, ngf/ndf {a.ngf}/{a.ndf}, "
          f"{a.steps} steps, {a.repeats} rounds (medians; range in brackets), /proc polled every {a.poll} s "
          f"({a.final_poll} s over the last two steps and the final checkpoint)", "",
          "| samples | set MiB | " + " | ".join(f"{k} peak RSS MiB" for k in roles)
          + " | img/s | data ms/step (slowest rank) | wall s | load 1m before/after |",
          "|---|---|" + "---|" * len(roles) + "---|---|---|---|"]
    for x in by_size:
        med, rng = x["peak_rss_mib_median"], x["peak_rss_mib_range"]
        ips, ds = x["images_per_sec_median"], x["data_seconds_median"]
        cells = [str(x["samples"]), f"{x['set_mib']:.0f}"]
        cells += [f"{med[k]:.1f} [{rng[k][0]:.1f}-{rng[k][1]:.1f}]" if k in med else "-" for k in roles]
        cells += [f"{ips:.1f}" if ips is not None else "-", f"{ds * 1e3:.3f}" if ds is not None else "-",
                  f"{x['wall_seconds_median']:.1f}",
                  ", ".join(f"{b:.2f}/{e:.2f}" for b, e in x["loadavg_1m"])]
        md.append("| " + " | ".join(cells) + " |")
    if len(by_size) > 1:
        md.append(f"| ratio {large['samples']}/{small['samples']} | {large['set_mib'] / small['set_mib']:.2f} | "
                  + " | ".join(f"{ratios[k]:.3f}" if k in ratios else "-" for k in roles) + " | | | | |")
        md.append("")
        md.append(f"Within 10% for every process: {'yes' if within else 'NO'}; coordinator peak (highest run) "
                  f"{coord_max:.1f} MiB ({coord_max * 2 ** 20 / 1e6:.1f} MB), under 200 MB: "
                  f"{'yes' if coord_ok else 'NO'}.")
    text = "\n".join(md)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")

if __name__ == "__main__":
    main()
