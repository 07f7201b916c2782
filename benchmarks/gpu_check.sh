#!/usr/bin/env bash
# The prepared GPU check (issue 11): one command, under 8 minutes on a machine with an NVIDIA GPU.
#
#     benchmarks/gpu_check.sh [--out DIR]        on a GPU machine, from the repository root or anywhere
#     benchmarks/gpu_check.sh --cpu-smoke        a tiny version of every step on the CPU, to test the script
#
# Steps (each with its own time limit and log in DIR, default ./gpu-check-<UTC time>):
#   1. setup     make install (a CUDA torch where a GPU is found) and the bench extra (TRL) when missing;
#                the GPU, torch, CUDA and bf16 support as torch sees them
#   2. queue     the real tier's queue (SmolLM2-135M-Instruct, 3 jobs) in bf16 through `loraq run --devices 0`:
#                every job completed on its first attempt, on cuda, pinned (CUDA_VISIBLE_DEVICES=0 in the
#                trainer), with the CUDA memory fields (cuda_allocated_mb, cuda_reserved_mb, cuda_peak_mb)
#   3. ray       one real job through `loraq run --executor ray --devices 0` (Ray's GPU path), checked alike
#   4. bench     benchmarks/bench_real.py --device cuda: plain PEFT + Trainer, TRL, loraq in bf16; with
#                gradient checkpointing on vs off (CUDA peak memory)
# Prints PASS/FAIL per step and the figures; exits 1 if any step failed, 2 on a usage error or when
# the GPU mode finds no GPU. Copy the summary and bench.log into benchmarks/README.md.
#
# --cpu-smoke runs the same steps on the CPU with tiny sizes (one real job; bench_real.py on 8 rows
# of at most 96 tokens, one round; without TRL where it is not installed), so the script itself is
# tested on a machine without a GPU: about 3-5 minutes on 2 cores.
set -uo pipefail

MODE=gpu
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) MODE=cpu ;;
        --out) shift; OUT="${1:?--out needs a folder}" ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (use --cpu-smoke, --out DIR or --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="$ROOT/.venv/bin/python"

if [ "$MODE" = gpu ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi -L fails); run it on a GPU machine, or test the script with --cpu-smoke" >&2
    exit 2
fi

OUT="${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT" || exit 2
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}" TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore
export MODE PY
START=$(date +%s)
declare -a SUMMARY=()
FAILED=0

# step NAME LIMIT_S CMD...: run CMD with a time limit, its output in $OUT/NAME.log; record PASS/FAIL.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*"
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs, so in a child bash
        timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $1" >"$OUT/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    fi
    local rc=$? t=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("PASS  $name  ${t} s")
    else
        [ $rc -eq 124 ] && echo "   timed out after ${limit} s" >>"$OUT/$name.log"
        SUMMARY+=("FAIL  $name  ${t} s  (exit $rc; see $OUT/$name.log)")
        FAILED=1
    fi
    tail -n 25 "$OUT/$name.log"
}

setup() {
    make install >/dev/null || return 1
    if ! "$PY" -c "import trl" >/dev/null 2>&1; then
        if [ "$MODE" = gpu ]; then
            .venv/bin/pip install --disable-pip-version-check -q -e ".[bench]" || return 1
        else
            echo "trl is not installed: the smoke run leaves TRL out (pip install -e '.[bench]' to include it)"
        fi
    fi
    [ "$MODE" = gpu ] && nvidia-smi
    "$PY" - "$MODE" <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if sys.argv[1] == "gpu":
    if not torch.cuda.is_available():
        sys.exit("torch sees no GPU: a CPU build of torch is installed (make install takes a CUDA build where "
                 "nvidia-smi works; remove .venv and run it again)")
    print(f"device 0: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
    "$PY" tools/real_model.py
}

step setup 600 setup
if [ "$MODE" = gpu ]; then
    DEV=0
    TRAINERS=plain,trl,loraq
    step queue 300 "$PY" benchmarks/bench_real_queue.py --devices "$DEV" --precision bf16 --check
    step ray 300 "$PY" benchmarks/bench_real_queue.py --devices "$DEV" --precision bf16 --executor ray --jobs digits --check
    step bench 420 "$PY" benchmarks/bench_real.py --device cuda --rows 256 --eval-rows 32 --rounds 2 --ckpt-rows 64
else
    DEV=cpu
    TRAINERS=plain,loraq
    "$PY" -c "import trl" >/dev/null 2>&1 && TRAINERS=plain,trl,loraq
    step queue 300 "$PY" benchmarks/bench_real_queue.py --devices "$DEV" --jobs digits --check
    if "$PY" -c "import ray" >/dev/null 2>&1; then
        step ray 300 "$PY" benchmarks/bench_real_queue.py --devices "$DEV" --executor ray --jobs digits --check
    else
        SUMMARY+=("SKIP  ray  (ray is not installed: pip install -e '.[ray]')")
    fi
    step bench 420 "$PY" benchmarks/bench_real.py --device cpu --rows 8 --eval-rows 4 --rounds 1 --max-seq-len 96 \
        --ckpt-rows 8 --trainers "$TRAINERS"
fi

echo
echo "gpu_check.sh ($MODE) in $(( $(date +%s) - START )) s; logs in $OUT"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
