#!/usr/bin/env python3
"""Side-by-side GPU benchmark: dcgan-at-scale's CUDA training step (gpu_step_bench) against
PyTorch eager with cuDNN, the same DCGAN-64 networks and step (bench/compare.py's
`build_dcgan` and `example_step`, imported), same GPU, same run; then NCCL's all-reduce on a
buffer the size of the gradients.

    cargo build --release -p dcgan-bench        # or scripts/build-gpu-bundle.sh for a GPU box
    python3 bench/gpu_compare.py --batches 128,512
    python3 bench/gpu_compare.py --bin target/gpu-bundle/bin/gpu_step_bench

For each batch and precision the two programs alternate, `--repeats` times each, each run in a
fresh process; the table gives median images/s and their ratio. "fp32" is full fp32 on both
sides (cuBLAS default math; PyTorch with TF32 off for cuDNN and matmuls); "tf32" lets both use
TF32 tensor cores (PyTorch's cuDNN default). Without a CUDA-enabled torch the table has our
column only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_BIN = os.path.join(ROOT, "target", "release", "gpu_step_bench")


def torch_worker(model, batch, tf32, steps, warmup):
    """The PyTorch example's networks and step on cuda:0 (cuDNN autotuned); one JSON line."""
    import torch

    sys.path.insert(0, HERE)
    from compare import build_dcgan, example_step

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    device = torch.device("cuda:0")
    net_g, net_d, opt_g, opt_d, criterion, cfg = build_dcgan(model, device)
    size, nc = cfg["image_size"], cfg["nc"]
    real = torch.rand(batch, nc, size, size, device=device) * 2 - 1
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        err_d, err_g = example_step(net_g, net_d, opt_g, opt_d, criterion, real, cfg["nz"])
        # Reading the losses, as our step does, waits for the GPU.
        losses = (err_d.item(), err_g.item())
        if step >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    print(json.dumps({
        "program": "pytorch-cuda", "model": model, "batch": batch, "tf32": tf32,
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "step_seconds_median": step_s, "images_per_sec": batch / step_s,
        "loss_d": losses[0], "loss_g": losses[1],
    }))


def torch_available():
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() == "True"
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_json(cmd, timeout):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=DEFAULT_BIN, help="the gpu_step_bench executable")
    ap.add_argument("--model", default="dcgan64", choices=["dcgan64", "dcgan32"])
    ap.add_argument("--batches", default="128,512")
    ap.add_argument("--precisions", default="fp32,tf32", help="comma-separated: fp32, tf32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds for one run of either program")
    ap.add_argument("--no-nccl", action="store_true", help="skip the all-reduce measurement")
    ap.add_argument("--torch-worker", nargs=5, metavar=("MODEL", "BATCH", "TF32", "STEPS", "WARMUP"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        m, b, tf, s, w = a.torch_worker
        torch_worker(m, int(b), tf == "1", int(s), int(w))
        return
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} is missing: run `cargo build --release -p dcgan-bench` (or scripts/build-gpu-bundle.sh)")
    with_torch = torch_available()
    if not with_torch:
        print("note: no CUDA-enabled torch in this Python; PyTorch columns are empty", file=sys.stderr)

    rows = []
    gpu = torch_version = None
    for precision in a.precisions.split(","):
        tf32 = precision.strip() == "tf32"
        for batch in [int(b) for b in a.batches.split(",")]:
            ours, theirs = [], []
            for _ in range(a.repeats):
                cmd = [a.bin, "--model", a.model, "--batch", str(batch), "--steps", str(a.steps),
                       "--warmup", str(a.warmup)] + (["--tf32"] if tf32 else [])
                ours.append(run_json(cmd, a.timeout))
                gpu = ours[-1].get("gpu", gpu)
                if with_torch:
                    theirs.append(run_json([sys.executable, os.path.abspath(__file__), "--torch-worker", a.model,
                                            str(batch), "1" if tf32 else "0", str(a.steps), str(a.warmup)],
                                           a.timeout))
                    torch_version = f"{theirs[-1]['torch']}, cuDNN {theirs[-1]['cudnn']}"
            o = statistics.median(r["images_per_sec"] for r in ours)
            t = statistics.median(r["images_per_sec"] for r in theirs) if theirs else None
            gflops = statistics.median(r["gflops"] for r in ours)
            rows.append((a.model, batch, "tf32" if tf32 else "fp32", o, t, gflops))
            print(f"  done {a.model} batch {batch} {precision}", file=sys.stderr)

    print(f"GPU: {gpu}; PyTorch: {torch_version or 'not available'}; median of {a.repeats} alternating runs, "
          f"{a.steps} timed steps each")
    print()
    head = ("config", "batch", "precision", "ours img/s", "torch img/s", "ratio", "ours GFLOP/s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m, b, p, o, t, g in rows:
        ts = f"{t:.0f}" if t else "-"
        ratio = f"{o / t:.2f}x" if t else "-"
        print(f"| {m} | {b} | {p} | {o:.0f} | {ts} | {ratio} | {g:.0f} |")

    if not a.no_nccl:
        r = run_json([a.bin, "--model", a.model, "--nccl"], a.timeout)
        print()
        print(f"NCCL all-reduce (mean) of the gradients ({r['floats']} floats, {r['bytes'] / 2**20:.1f} MiB), "
              f"{r['ranks']} rank: {r['seconds_per_call'] * 1e6:.1f} us per call, algbw {r['algbw_gbps']:.1f} GB/s "
              f"(busbw needs 2 or more ranks)")


if __name__ == "__main__":
    main()
