#!/usr/bin/env python3
"""Data-parallel efficiency on one machine: 2 workers of 1 thread each against 1 worker of 2
threads, at the same global batch (DCGAN-32, batch 64), through the real coordinator and
workers (gRPC, shards, TCP ring all-reduce). Then the ring's bus bandwidth beside memcpy.

    cargo build --release -p coordinator -p worker -p allreduce
    python3 bench/data_parallel.py [--dataset mnist:../shared/data/mnist] [--repeats 3]

Each configuration runs --steps steps, `--repeats` times, alternating; images/s is the median
over the steps after the first --skip of each run (metrics.jsonl), then the median of runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def run(workers, threads, args):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [os.path.join(BIN, "coordinator"), "--workers", str(workers), "--worker-threads", str(threads),
               "--dataset", args.dataset, "--image-size", "32", "--batch-size", "64", "--max-steps", str(args.steps),
               "--epochs", "100", "--run-dir", run_dir, "--listen", "127.0.0.1:0", "--quiet",
               "--checkpoint-every", "0"]
        subprocess.run(cmd, check=True, capture_output=True)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [json.loads(l) for l in f if l.strip()]
    steady = [l for l in lines if l["step"] > args.skip]
    return {
        "images_per_sec": statistics.median(l["images_per_sec"] for l in steady),
        "all_reduce_seconds": statistics.median(l["all_reduce_seconds"] for l in steady),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.path.join(ROOT, "..", "shared", "data", "mnist")
    ap.add_argument("--dataset", default=f"mnist:{default_data}" if os.path.isdir(default_data) else "shapes")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    one, two = [], []
    for _ in range(a.repeats):
        one.append(run(1, 2, a))
        two.append(run(2, 1, a))
    o = statistics.median(r["images_per_sec"] for r in one)
    t = statistics.median(r["images_per_sec"] for r in two)
    ar = statistics.median(r["all_reduce_seconds"] for r in two)
    print(f"dataset {a.dataset}, DCGAN-32, global batch 64, {a.steps} steps x {a.repeats} runs (median)")
    print("| configuration | images/s | all-reduce s/step |")
    print("|---|---|---|")
    print(f"| 1 worker x 2 threads | {o:.1f} | - |")
    print(f"| 2 workers x 1 thread | {t:.1f} | {ar:.4f} |")
    print(f"efficiency (2x1 / 1x2): {100 * t / o:.0f}%")
    sys.stdout.flush()
    ring = subprocess.run([os.path.join(BIN, "ring_bench"), "--world", "2", "--mib", "16", "--iters", "20"],
                          check=True, capture_output=True, text=True).stdout
    print(ring)


if __name__ == "__main__":
    main()
