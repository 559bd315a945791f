#!/usr/bin/env python3
"""Training speed through each data path, side by side: prepared shards read from disk by the
workers (`--worker-data disk`, the default path) against the in-memory path (`memory`: every
worker decodes the source into f32 itself) and, optionally, the gRPC stream (`stream`).

Runs the real coordinator and workers in rounds; each round runs every mode once, the order
alternating, and the figure is the median of the per-step images/s of metrics.jsonl after a
warm-up, with the per-round ratio to the memory path. The source is prepared into a cache once
before the rounds, so preparation is not timed.

    python3 bench/data_paths.py --dataset cifar10:../shared/data/cifar-10 --rounds 3 --steps 60
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run(args, mode, run_dir, cache):
    cmd = [
        args.coordinator, "--workers", str(args.workers), "--worker-threads", "1",
        "--dataset", args.dataset, "--image-size", str(args.image_size),
        "--ngf", str(args.width), "--ndf", str(args.width), "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--checkpoint-every", str(args.steps),
        "--run-dir", run_dir, "--data-cache", cache, "--worker-data", mode, "--quiet",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{mode}: coordinator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    rates = [s["images_per_sec"] for s in steps[args.warmup:]]
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--coordinator", default="target/release/coordinator")
    p.add_argument("--modes", default="disk,memory", help="comma-separated: disk, memory, stream")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of each run's median")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="ngf = ndf")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    modes = args.modes.split(",")
    tmp = tempfile.mkdtemp(prefix="data_paths_")
    cache = os.path.join(tmp, "cache")
    try:
        run(args, "disk", os.path.join(tmp, "prepare-once"), cache)  # prepares the cache
        results = {m: [] for m in modes}
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else list(reversed(modes))
            for m in order:
                results[m].append(run(args, m, os.path.join(tmp, f"r{r}-{m}"), cache))
        base = "memory" if "memory" in modes else modes[0]
        lines = [
            f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.workers} workers x 1 thread, {args.dataset} at "
            f"{args.image_size}, ngf=ndf={args.width}, batch {args.batch_size}, {args.steps} steps "
            f"(first {args.warmup} left out), {args.rounds} rounds",
            "",
            f"| path | median img/s per round | median | ratio to {base} per round | median ratio |",
            "|---|---|---|---|---|",
        ]
        summary = {"cpu": cpu_model(), "dataset": args.dataset, "rounds": results}
        for m in modes:
            ratios = [x / y for x, y in zip(results[m], results[base])]
            lines.append(
                f"| {m} | {', '.join(f'{v:.1f}' for v in results[m])} | {statistics.median(results[m]):.1f} | "
                f"{', '.join(f'{v:.3f}' for v in ratios)} | {statistics.median(ratios):.3f} |"
            )
            summary[f"{m}_median_ratio"] = statistics.median(ratios)
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
