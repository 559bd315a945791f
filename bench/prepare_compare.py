#!/usr/bin/env python3
"""Side-by-side CPU benchmark of data preparation: `dcgan prepare` (decode, Resize + CenterCrop,
pack into u8 shards) against torchvision's usual input pipeline over the same image folder, same
machine, same run.

    cargo build --release -p dcgan-tool --bin dcgan
    python3 bench/prepare_compare.py /work/bench-data/jpeg50k --image-size 64 \\
        --torch-python /work/venv-torch/bin/python --json /tmp/prepare_compare.json

The two programs:
  ours   `dcgan prepare --source folder:DIR --out TMP --image-size S`, TMP removed before each run
         so that every run starts from scratch.
  torch  `datasets.ImageFolder(DIR, Compose([Resize(S), CenterCrop(S), ToTensor(),
         Normalize((0.5,)*3, (0.5,)*3)]))` through `DataLoader(batch_size=256,
         num_workers=os.cpu_count(), shuffle=False)`, one full pass, in a fresh process of the
         `--torch-python` interpreter (the workers run one intra-op thread each, as DataLoader
         sets them up).

Every run is a fresh process. One round runs the two programs back to back, which goes first
alternating from round to round, and `--repeats` rounds are made; the table gives the median
images/s of each program and the median and range of the per-round ratio ours / torch (the two
runs of a round are seconds apart, so the ratio is what a shared VM's drift touches least).
images/s is whole-process: from start to exit, with the interpreter's start and torch's import on
one side and the writing of the shards on the other; the torch worker's own timing of its pass
(from building the dataset to the last batch) is reported beside it, and so is the rate that
`dcgan prepare` prints. CPU time is the process's and its reaped children's (the DataLoader
workers). Beside them, the CPU that other processes used meanwhile (busy cores on average, from
/proc/stat less the program's own CPU time) and the host's steal: a noisy run shows itself.
Memory: the peak RSS of the largest single process (exact, from wait4), and the peak over the run
of the summed RSS and PSS of the whole process tree (sampled every `--sample-ms`; PSS shares pages
mapped by several processes among them, so it is the fair total for torch's forked workers).

All files are read once before the first round (`--no-warm-cache` skips it), so neither program
pays for the first cold read of the folder. `--limit N` runs both on the first N images (sorted
by path) of the folder, hard-linked into a temporary folder of the same layout.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Extensions both programs read (dcgan's folder source: PNG, JPEG, WebP; torchvision's
# ImageFolder takes these and a few more).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def torch_worker(folder, size, batch, workers):
    """One full pass of torchvision's ImageFolder pipeline; prints one JSON line."""
    start = time.perf_counter()
    import torch
    import torchvision
    from torchvision import datasets, transforms

    imported = time.perf_counter()
    dataset = datasets.ImageFolder(folder, transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize((0.5,) * 3, (0.5,) * 3)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
    images, checksum = 0, 0.0
    for x, _ in loader:
        if tuple(x.shape[1:]) != (3, size, size):
            sys.exit(f"unexpected batch shape {tuple(x.shape)}")
        images += x.shape[0]
        checksum += float(x[:, :, 0, 0].sum())  # touches every batch (a first pixel per image)
    end = time.perf_counter()
    print(json.dumps({
        "program": "torch", "torch": torch.__version__, "torchvision": torchvision.__version__,
        "images": images, "import_seconds": imported - start, "pass_seconds": end - imported,
        "pass_images_per_sec": images / (end - imported), "checksum": checksum,
    }))


def list_images(folder):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def limited_copy(folder, files, dest):
    """Hard links (copies where links fail) of `files` under `dest`, keeping paths relative to `folder`."""
    for path in files:
        target = os.path.join(dest, os.path.relpath(path, folder))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)


def warm_cache(files):
    chunk = bytearray(1 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(chunk):
                pass


def tree_memory(pid):
    """(summed RSS, summed PSS) in KiB of `pid` and its descendants; processes that vanish while
    being read are skipped."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return rss, pss


def cpu_ticks():
    """(busy, steal, total) clock ticks of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def run_measured(cmd, sample_s):
    """Runs `cmd`; returns (stdout, wall seconds, rusage of the process and its reaped children,
    peak summed tree RSS KiB, peak summed tree PSS KiB). Raises on a non-zero exit."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peaks = [0, 0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss, pss = tree_memory(proc.pid)
                peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-4000:]}")
    return stdout, wall, usage, peaks[0], peaks[1]


def measure(name, cmd, images, sample_s, cores):
    ticks_before = cpu_ticks()
    stdout, wall, usage, tree_rss, tree_pss = run_measured(cmd, sample_s)
    busy, steal, total = (after - before for after, before in zip(cpu_ticks(), ticks_before))
    cpu = usage.ru_utime + usage.ru_stime
    # What else ran meanwhile: other processes' busy cores on average, and the host's steal.
    other_cores = max(0.0, busy / os.sysconf("SC_CLK_TCK") - cpu) / wall
    result = {
        "program": name, "command": cmd, "images": images, "wall_seconds": wall,
        "images_per_sec": images / wall, "images_per_sec_per_core": images / wall / cores,
        "cpu_seconds": cpu, "images_per_cpu_second": images / cpu if cpu else None,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
        # The sampler can miss a short peak: the tree's sum is at least the largest process's.
        "peak_tree_rss_mib": max(tree_rss, usage.ru_maxrss) / 1024.0, "peak_tree_pss_mib": tree_pss / 1024.0,
        "other_busy_cores": other_cores, "steal_share": steal / total if total else 0.0,
        "stdout_tail": stdout[-2000:],
    }
    print(f"    {name}: {wall:.2f} s, {images / wall:.0f} images/s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB, "
          f"others busy {other_cores:.2f} cores, steal {100 * result['steal_share']:.0f}%", file=sys.stderr)
    return result


def du_mib(path):
    total = 0
    for dirpath, _, filenames in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in filenames)
    return total / (1 << 20)


def cpu_model():
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"model_name": fields.get("model name", platform.processor() or "unknown"),
            "family": fields.get("cpu family"), "model": fields.get("model")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="image folder (class subfolders of PNG/JPEG/WebP files)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--dcgan", default=os.path.join(ROOT, "target", "release", "dcgan"), help="the dcgan binary")
    ap.add_argument("--torch-python", default=sys.executable, help="a python interpreter with torch and torchvision")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each runs both programs once)")
    ap.add_argument("--limit", type=int, help="only the first N images (sorted by path), for quick trials")
    ap.add_argument("--batch-size", type=int, default=256, help="torch DataLoader batch size")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="torch DataLoader workers")
    ap.add_argument("--programs", default="ours,torch", help="comma-separated subset of ours,torch")
    ap.add_argument("--work-dir", help="where the shards and --limit's folder go (default: a new temporary folder)")
    ap.add_argument("--no-warm-cache", action="store_true", help="do not read every file once before the rounds")
    ap.add_argument("--sample-ms", type=float, default=200.0, help="process-tree memory sampling period")
    ap.add_argument("--json", help="also write the results here as JSON")
    ap.add_argument("--torch-worker", nargs=4, metavar=("FOLDER", "SIZE", "BATCH", "WORKERS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        folder, size, batch, workers = a.torch_worker
        torch_worker(folder, int(size), int(batch), int(workers))
        return
    if not a.folder:
        ap.error("the image folder is required")
    programs = [p for p in a.programs.split(",") if p]
    if not programs or set(programs) - {"ours", "torch"}:
        ap.error("--programs takes ours and/or torch")
    if "ours" in programs and not os.access(a.dcgan, os.X_OK):
        sys.exit(f"{a.dcgan} is missing: run `cargo build --release -p dcgan-tool --bin dcgan` first")

    folder = os.path.abspath(a.folder)
    files = list_images(folder)
    if not files:
        sys.exit(f"no PNG/JPEG/WebP images under {folder}")
    work = a.work_dir or tempfile.mkdtemp(prefix="prepare_compare_")
    os.makedirs(work, exist_ok=True)
    if a.limit is not None and a.limit < len(files):
        files = files[:a.limit]
        subset = os.path.join(work, "images")
        shutil.rmtree(subset, ignore_errors=True)
        limited_copy(folder, files, subset)
        folder = subset
    images = len(files)
    shards = os.path.join(work, "shards")
    cores = os.cpu_count()
    cpu = cpu_model()
    print(f"{images} images in {folder}, {cores} cores ({cpu['model_name']})", file=sys.stderr)
    if not a.no_warm_cache:
        warm_cache(files)

    ours_cmd = [a.dcgan, "prepare", "--source", f"folder:{folder}", "--out", shards, "--image-size", str(a.image_size)]
    torch_cmd = [a.torch_python, os.path.abspath(__file__), "--torch-worker", folder, str(a.image_size),
                 str(a.batch_size), str(a.workers)]
    runs = {p: [] for p in programs}
    shard_mib = None
    for round_ in range(a.repeats):
        order = programs if round_ % 2 == 0 else programs[::-1]
        for program in order:
            if program == "ours":
                shutil.rmtree(shards, ignore_errors=True)
                result = measure("ours", ours_cmd, images, a.sample_ms / 1000, cores)
                # dcgan's own rate (its line "prepared N images ... (R images/s)"), if it printed one.
                found = re.search(r"\(([0-9.]+) images/s\)", result["stdout_tail"])
                result["reported_images_per_sec"] = float(found.group(1)) if found else None
                runs["ours"].append(result)
                shard_mib = du_mib(shards)
            else:
                result = measure("torch", torch_cmd, images, a.sample_ms / 1000, cores)
                worker = json.loads(result["stdout_tail"].strip().splitlines()[-1])
                if worker["images"] != images:
                    sys.exit(f"torchvision read {worker['images']} images, expected {images}")
                result["worker"] = worker
                runs["torch"].append(result)
        print(f"  round {round_ + 1} of {a.repeats} done", file=sys.stderr)
    if not a.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda rs, k: statistics.median(r[k] for r in rs)
    summary = {}
    for program, rs in runs.items():
        summary[program] = {k: med(rs, k) for k in ("images_per_sec", "images_per_sec_per_core", "cpu_seconds",
                                                       "images_per_cpu_second", "peak_rss_mib", "peak_tree_rss_mib",
                                                       "peak_tree_pss_mib", "wall_seconds", "other_busy_cores",
                                                       "steal_share")}
    if "torch" in runs:
        summary["torch"]["pass_images_per_sec"] = statistics.median(r["worker"]["pass_images_per_sec"]
                                                                    for r in runs["torch"])
        summary["torch"]["import_seconds"] = statistics.median(r["worker"]["import_seconds"] for r in runs["torch"])
        summary["torch"]["versions"] = {k: runs["torch"][0]["worker"][k] for k in ("torch", "torchvision")}
    if shard_mib is not None:
        summary["ours"]["shards_mib"] = shard_mib
        reported = [r["reported_images_per_sec"] for r in runs["ours"] if r["reported_images_per_sec"]]
        summary["ours"]["reported_images_per_sec"] = statistics.median(reported) if reported else None
    ratios = None
    if len(runs) == 2:
        ratios = [o["images_per_sec"] / t["images_per_sec"] for o, t in zip(runs["ours"], runs["torch"])]
        summary["ratio_ours_over_torch"] = {"per_round": ratios, "median": statistics.median(ratios),
                                            "min": min(ratios), "max": max(ratios)}

    print(f"{images} images of `{os.path.abspath(a.folder)}`{f' (--limit {a.limit})' if a.limit else ''} to "
          f"{a.image_size}x{a.image_size}; {cpu['model_name']} (family {cpu['family']}, model {cpu['model']}), "
          f"{cores} cores; {a.repeats} rounds"
          + (f"; torch {summary['torch']['versions']['torch']}, torchvision "
             f"{summary['torch']['versions']['torchvision']}, DataLoader batch {a.batch_size}, {a.workers} workers"
             if "torch" in runs else ""))
    print()
    head = ("program", "images/s", "images/s per core", "images per CPU-s", "CPU s", "peak RSS MiB (largest process)",
            "peak RSS MiB (tree, sampled)", "peak PSS MiB (tree, sampled)", "others' busy cores", "steal")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for program in runs:
        s = summary[program]
        print(f"| {program} | {s['images_per_sec']:.0f} | {s['images_per_sec_per_core']:.0f} | "
              f"{s['images_per_cpu_second']:.0f} | {s['cpu_seconds']:.1f} | {s['peak_rss_mib']:.0f} | "
              f"{s['peak_tree_rss_mib']:.0f} | {s['peak_tree_pss_mib']:.0f} | {s['other_busy_cores']:.2f} | "
              f"{100 * s['steal_share']:.0f}% |")
    print()
    if ratios:
        print(f"ours / torch images/s, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median "
              f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
    if "torch" in runs:
        print(f"torch's pass alone (after its {summary['torch']['import_seconds']:.1f} s of imports): "
              f"{summary['torch']['pass_images_per_sec']:.0f} images/s")
    if shard_mib is not None:
        reported = summary["ours"]["reported_images_per_sec"]
        print(f"ours wrote {shard_mib:.1f} MiB of shards"
              + (f"; its own timing (after start-up): {reported:.0f} images/s" if reported else ""))

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"folder": os.path.abspath(a.folder), "images": images, "image_size": a.image_size,
                       "limit": a.limit, "repeats": a.repeats, "cores": cores, "cpu": cpu,
                       "batch_size": a.batch_size, "workers": a.workers, "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
