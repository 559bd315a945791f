#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and no Rust toolchain, from prebuilt binaries
# (scripts/build-gpu-bundle.sh): the CUDA conformance suite against the CPU reference, NCCL with
# one rank, a short training run of the coordinator with one CUDA worker, and the GPU benchmark
# beside PyTorch. Every log and result goes under OUTDIR, and into OUTDIR/gpu-check-results.tar.gz
# (logs and JSON only, no checkpoints); the whole check stays under 6 minutes, so that it can run
# twice within a 15-minute GPU lease.
#
#   scripts/gpu-check.sh OUTDIR [BUNDLE_DIR]
#
# BUNDLE_DIR defaults to $GPU_BUNDLE, else the bundle this script sits in, else
# target/gpu-bundle. OUTDIR/summary.txt lists each stage's exit status and time; the script
# exits non-zero when a stage failed.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [BUNDLE_DIR]" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -ge 2 ]]; then
    bundle=$2
elif [[ -n ${GPU_BUNDLE:-} ]]; then
    bundle=$GPU_BUNDLE
elif [[ -x $here/../bin/gpu_step_bench ]]; then
    bundle=$here/..
else
    bundle=$here/../target/gpu-bundle
fi
bundle=$(cd "$bundle" 2>/dev/null && pwd) || { echo "no bundle at $bundle: run scripts/build-gpu-bundle.sh" >&2; exit 2; }
bench_dir=$bundle/bench
[[ -f $bench_dir/gpu_compare.py ]] || bench_dir=$here/../bench

# The whole check must finish within 6 minutes; each stage gets its own budget, cut to what is
# left, in order of importance (a lease that ends early still has the most telling results).
total_budget=340
start=$SECONDS
status=0
: >"$out/summary.txt"

# stage NAME BUDGET_SECONDS COMMAND...: runs COMMAND under `timeout`, output to OUTDIR/NAME.log.
stage() {
    local name=$1 budget=$2
    shift 2
    local left=$((total_budget - (SECONDS - start)))
    if ((left < 10)); then
        echo "$name: skipped (out of time)" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    ((budget > left)) && budget=$left
    local t0=$SECONDS
    echo "== $name (at most ${budget}s): $*" >&2
    timeout --kill-after=10 "$budget" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if ((rc == 124 || rc == 137)); then verdict="timed out after ${budget}s"; elif ((rc != 0)); then verdict="FAILED ($rc)"; fi
    ((rc != 0)) && status=1
    echo "$name: $verdict in $((SECONDS - t0))s (log: $name.log)" | tee -a "$out/summary.txt"
}

# cudarc loads NVIDIA's libraries by name: NCCL only as `libnccl.so`, which NCCL's runtime
# packages do not ship, and pip's CUDA wheels live in site-packages/nvidia/*/lib, which the
# loader does not search. Put those directories on LD_LIBRARY_PATH and make unversioned links
# for whatever has only a versioned name.
setup_libraries() {
    local links=$out/lib-links dirs=() d
    mkdir -p "$links"
    if command -v python3 >/dev/null; then
        while IFS= read -r d; do dirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.add(d)
            print(d)
PY
        )
    fi
    for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
        [[ -d $d ]] && dirs+=("$d")
    done
    local search=()
    IFS=: read -r -a search <<<"${LD_LIBRARY_PATH:-}"
    search+=("${dirs[@]}")
    local stem
    for stem in nccl cublas cublasLt nvrtc; do
        local have=""
        for d in "${search[@]}"; do
            [[ -n $d && -e $d/lib$stem.so ]] && { have=$d/lib$stem.so; break; }
        done
        if [[ -z $have ]]; then
            for d in "${search[@]}"; do
                [[ -n $d ]] || continue
                local f
                f=$(ls "$d"/lib"$stem".so.[0-9]* 2>/dev/null | sort -V | tail -n 1)
                if [[ -n $f ]]; then
                    ln -sf "$f" "$links/lib$stem.so"
                    have="$links/lib$stem.so -> $f"
                    break
                fi
            done
        fi
        echo "lib$stem.so: ${have:-not found}"
    done
    local joined
    joined=$(IFS=:; echo "${dirs[*]}")
    export LD_LIBRARY_PATH="$links${joined:+:$joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

{
    echo "bundle: $bundle"
    cat "$bundle/MANIFEST" 2>/dev/null
    echo "host: $(uname -a)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    setup_libraries
} >"$out/environment.txt" 2>&1
# The exported LD_LIBRARY_PATH must reach this shell, not a subshell.
setup_libraries >/dev/null 2>&1
echo "environment: see environment.txt" >>"$out/summary.txt"

tests=$bundle/tests
bin=$bundle/bin

# 1. Device selection and the unit tests (NVRTC compiles the kernels here, where installed).
stage unit-tests 30 bash -c "'$tests/kernels_unit' && '$tests/device_selection'"

# 2. Every CUDA op and three whole steps against the CPU reference (not NCCL: stage 3).
stage conformance 120 "$tests/cuda_conformance" --ignored --test-threads=1 --skip nccl

# 3. NCCL: a one-rank communicator that really reduces, a step and the weighted, averaged
#    gradients with the stop vote through it, and a missing peer abandoned (stop, then timeout)
#    with the GPU still usable after the abort.
stage nccl 60 "$tests/cuda_conformance" --ignored --test-threads=1 nccl

# 4. A short training run: the coordinator with one worker on the GPU.
if [[ -x $bin/coordinator && -x $bin/worker ]]; then
    stage train 60 "$bin/coordinator" --workers 1 --device cuda --worker-bin "$bin/worker" \
        --dataset shapes --image-size 64 --batch-size 128 --max-steps 200 --checkpoint-every 100 \
        --run-dir "$out/run" --listen 127.0.0.1:50161 --quiet
else
    echo "train: skipped (no coordinator/worker in the bundle)" | tee -a "$out/summary.txt"
fi

# 5. The benchmark beside PyTorch (our column alone when there is no CUDA torch), and NCCL's
#    all-reduce bandwidth on the gradients' size.
if command -v python3 >/dev/null; then
    stage benchmark 90 python3 "$bench_dir/gpu_compare.py" --bin "$bin/gpu_step_bench" --batches 128,512 \
        --repeats 1 --steps 10 --warmup 3 --timeout 60
else
    stage benchmark 90 bash -c "for b in 128 512; do '$bin/gpu_step_bench' --batch \$b --steps 10; done; \
        '$bin/gpu_step_bench' --nccl"
fi

echo "total: $((SECONDS - start))s" | tee -a "$out/summary.txt"

# One small archive of what tells the story: logs, summaries, JSON and the run's metrics, never
# its checkpoints or samples.
(cd "$out" && find . -type f \( -name '*.log' -o -name '*.txt' -o -name '*.json' -o -name '*.jsonl' \) \
    -not -path './run/checkpoints/*' -not -path './lib-links/*' -print0 |
    tar --null -czf gpu-check-results.tar.gz --files-from=-)
rm -rf "$out/run/checkpoints"
echo "results: $out/gpu-check-results.tar.gz ($(du -k "$out/gpu-check-results.tar.gz" | cut -f1) KiB)"
exit $status
