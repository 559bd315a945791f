#!/usr/bin/env python3
"""Side-by-side CPU benchmark: dcgan-at-scale's training step against the PyTorch DCGAN
example's, same configurations, same machine, same run.

    cargo build --release -p dcgan-bench
    python3 bench/compare.py            # needs torch (pip install torch); not needed by tests

Every run is a fresh process (so peak RSS is that configuration's alone). One round runs each
configuration once as a pair, the two programs back to back, and `--repeats` rounds are made;
which program goes first alternates from round to round. A shared VM's speed drifts over
minutes, so the rounds spread every configuration over the whole run, and the pair ratio (the
two programs a few seconds apart) is the figure that drift touches least: the table gives its
median and range beside the median images/s of each program, GFLOP/s, the share of the GEMM
peak measured in the same run, and the peak RSS.

`--precision bf16` runs our step with bf16 products (`step_bench --precision bf16`) against the
same PyTorch fp32 step (the baseline the bf16 target is stated against), and adds PyTorch's own
bf16 step (CPU autocast to bfloat16) to each round as a third program, with its column and ratio.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUST_BIN = os.path.join(ROOT, "target", "release", "step_bench")

CONFIGS = {
    "dcgan64": dict(image_size=64, nc=3, nz=100, ngf=64, ndf=64),
    "dcgan32": dict(image_size=32, nc=1, nz=100, ngf=64, ndf=64),
}


def build_dcgan(model, device="cpu"):
    """The PyTorch DCGAN example's generator and discriminator for CONFIGS[model], on `device`,
    with its Adam optimisers and loss: (net_g, net_d, opt_g, opt_d, criterion, cfg). Also used by
    bench/gpu_compare.py, so both comparisons time the same model."""
    import torch
    import torch.nn as nn

    cfg = CONFIGS[model]
    size, nc, nz, ngf, ndf = cfg["image_size"], cfg["nc"], cfg["nz"], cfg["ngf"], cfg["ndf"]
    layers = size.bit_length() - 3  # stride-2 layers: log2(size) - 2

    g = [nn.ConvTranspose2d(nz, ngf * 2 ** (layers - 1), 4, 1, 0, bias=False),
         nn.BatchNorm2d(ngf * 2 ** (layers - 1)), nn.ReLU(True)]
    for i in range(layers - 1, 0, -1):
        g += [nn.ConvTranspose2d(ngf * 2 ** i, ngf * 2 ** (i - 1), 4, 2, 1, bias=False),
              nn.BatchNorm2d(ngf * 2 ** (i - 1)), nn.ReLU(True)]
    g += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
    d = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    for i in range(layers - 1):
        d += [nn.Conv2d(ndf * 2 ** i, ndf * 2 ** (i + 1), 4, 2, 1, bias=False),
              nn.BatchNorm2d(ndf * 2 ** (i + 1)), nn.LeakyReLU(0.2, inplace=True)]
    d += [nn.Conv2d(ndf * 2 ** (layers - 1), 1, 4, 1, 0, bias=False), nn.Sigmoid()]
    net_g, net_d = nn.Sequential(*g).to(device), nn.Sequential(*d).to(device)
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return net_g, net_d, opt_g, opt_d, nn.BCELoss(), cfg


def example_step(net_g, net_d, opt_g, opt_d, criterion, real, nz):
    """One step of the example's loop: D on real (1) and on G(z).detach() (0), Adam; G through
    D (1), Adam. Returns (errD, errG) as tensors (reading them would synchronise a GPU)."""
    import torch

    batch, device = real.shape[0], real.device
    net_d.zero_grad()
    label = torch.full((batch,), 1.0, device=device)
    # .float(): under bf16 autocast D's output is bf16, and the loss wants both sides alike.
    err_real = criterion(net_d(real).view(-1).float(), label)
    err_real.backward()
    noise = torch.randn(batch, nz, 1, 1, device=device)
    fake = net_g(noise)
    label.fill_(0.0)
    err_fake = criterion(net_d(fake.detach()).view(-1).float(), label)
    err_fake.backward()
    opt_d.step()
    net_g.zero_grad()
    label.fill_(1.0)
    err_g = criterion(net_d(fake).view(-1).float(), label)
    err_g.backward()
    opt_g.step()
    return err_real + err_fake, err_g


def torch_worker(model, batch, threads, steps, warmup, precision="f32"):
    """Runs the PyTorch example's networks and training step, in fp32 or under CPU autocast to
    bfloat16; prints one JSON line."""
    import contextlib
    import torch

    torch.set_num_threads(threads)
    net_g, net_d, opt_g, opt_d, criterion, cfg = build_dcgan(model)
    size, nc = cfg["image_size"], cfg["nc"]
    real = torch.rand(batch, nc, size, size) * 2 - 1
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    for step in range(warmup + steps):
        t = time.perf_counter()
        with autocast:
            example_step(net_g, net_d, opt_g, opt_d, criterion, real, cfg["nz"])
        if step >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    print(json.dumps({
        "program": "pytorch", "model": model, "batch": batch, "threads": threads, "precision": precision,
        "torch": torch.__version__,
        "step_seconds_median": step_s, "images_per_sec": batch / step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dcgan64,dcgan32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="64", help="comma-separated batch sizes (e.g. 16,64,256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                    help="our products' precision; bf16 also times PyTorch under bf16 autocast")
    ap.add_argument("--torch-worker", nargs=6, metavar=("MODEL", "BATCH", "THREADS", "STEPS", "WARMUP", "PRECISION"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        m, b, t, s, w, p = a.torch_worker
        torch_worker(m, int(b), int(t), int(s), int(w), p)
        return
    if not os.path.exists(RUST_BIN):
        sys.exit(f"{RUST_BIN} is missing: run `cargo build --release -p dcgan-bench` first")

    threads_list = [int(t) for t in a.threads.split(",")]
    configs = [(m, b, t) for t in threads_list for m in a.models.split(",") for b in (int(x) for x in a.batches.split(","))]
    peaks = {t: run_json([RUST_BIN, "--model", "dcgan32", "--threads", str(t), "--steps", "1", "--warmup", "0",
                          "--batch", "2", "--gemm-peak"])["gemm_peak_gflops"] for t in threads_list}
    ours, theirs, theirs_bf16 = ({c: [] for c in configs} for _ in range(3))
    bf16 = a.precision == "bf16"
    for round_ in range(a.repeats):
        for model, batch, threads in configs:
            def torch_cmd(precision):
                return [sys.executable, __file__, "--torch-worker", model, str(batch), str(threads), str(a.steps),
                        str(a.warmup), precision]
            run_ours = lambda: ours[(model, batch, threads)].append(run_json(
                [RUST_BIN, "--model", model, "--threads", str(threads), "--batch", str(batch),
                 "--steps", str(a.steps), "--warmup", str(a.warmup), "--precision", a.precision]))
            run_theirs = lambda: theirs[(model, batch, threads)].append(run_json(torch_cmd("f32")))
            run_theirs_bf16 = lambda: theirs_bf16[(model, batch, threads)].append(run_json(torch_cmd("bf16")))
            order = [run_ours, run_theirs] + ([run_theirs_bf16] if bf16 else [])
            for run in (order if round_ % 2 == 0 else order[::-1]):
                run()
        print(f"  round {round_ + 1} of {a.repeats} done", file=sys.stderr)

    head = ("config", "batch", "threads", f"ours {a.precision} img/s", "torch img/s", "pair ratio", "pair range",
            "ours GFLOP/s", "torch GFLOP/s", "GEMM peak", "ours % peak", "torch % peak", "ours RSS MiB",
            "torch RSS MiB") + (("torch bf16 img/s", "ours / torch bf16") if bf16 else ())
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model, batch, threads in configs:
        o_runs, t_runs = ours[(model, batch, threads)], theirs[(model, batch, threads)]
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        o, t = med(o_runs, "images_per_sec"), med(t_runs, "images_per_sec")
        pairs = [x["images_per_sec"] / y["images_per_sec"] for x, y in zip(o_runs, t_runs)]
        gflops_per_image = med(o_runs, "gflops") / o
        og, tg, pk = o * gflops_per_image, t * gflops_per_image, peaks[threads]
        print(f"| {model} | {batch} | {threads} | {o:.1f} | {t:.1f} | {statistics.median(pairs):.2f}x | "
              f"{min(pairs):.2f}-{max(pairs):.2f} | {og:.1f} | {tg:.1f} | {pk:.0f} | {100 * og / pk:.0f}% | "
              f"{100 * tg / pk:.0f}% | {med(o_runs, 'peak_rss_mib'):.0f} | {med(t_runs, 'peak_rss_mib'):.0f} |",
              end="")
        if bf16:
            b_runs = theirs_bf16[(model, batch, threads)]
            b_pairs = [x["images_per_sec"] / y["images_per_sec"] for x, y in zip(o_runs, b_runs)]
            print(f" {med(b_runs, 'images_per_sec'):.1f} | {statistics.median(b_pairs):.2f}x |", end="")
        print()

if __name__ == "__main__":
    main()
