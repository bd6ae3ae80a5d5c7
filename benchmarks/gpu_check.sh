#!/usr/bin/env bash
# What only a GPU can show, in one command on one GPU, in at most 8 minutes:
#   1. the tests marked `cuda` (pytest -m cuda: AMP, channels-last, SyncBatchNorm, DDP over NCCL,
#      sliding-window evaluation on the GPU), at most 170 s;
#   2. benchmarks/gpu_check.py, at most 280 s: the DSSN step at the paper's PASCAL setting
#      (ResNet-101, crop 513, 2 + 2) in fp32, bf16 and research-style, DINOv2-B + DPT at crop 518,
#      4 + 4 once dssn.models.dpt exists, batched sliding-window evaluation against one window at
#      a time; then one Markdown table of everything, the tests' results included.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#   --dry-run  print the commands it would run and what they would run, then exit (needs no GPU)
#   --out DIR  keep the tests' JUnit XML, the table (gpu_check.md) and its rows (gpu_check.json)
# Environment: PYTHON (default: .venv/bin/python if there, else python3), GPU_PEAK_TFLOPS (dense
# bf16 peak of a device the table of known peaks lacks).
# Exit status: 0 when every test and measurement passed, and also at once when no CUDA GPU is
# visible (nothing to check; the message says so); 1 when something failed; 2 for a usage or
# set-up error (unknown option, no torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# 170 + 280 s and two short torch start-ups stay under 8 minutes. No measurement starts after
# BENCH_BUDGET_S, leaving 40 s for the one under way (an estimate: not yet timed on a GPU).
TEST_LIMIT_S=170
BENCH_LIMIT_S=280
BENCH_BUDGET_S=240

dry_run=0
out_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --out) [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; out_dir="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (--dry-run, --out DIR, --help)" >&2; exit 2 ;;
    esac
done

work="${out_dir:-$(mktemp -d)}"
[[ -n "$out_dir" ]] || trap 'rm -rf "$work"' EXIT
junit="$work/cuda-tests.xml"
tests_cmd=(timeout "$TEST_LIMIT_S" "$PYTHON" -m pytest -m cuda -q -rfE -p no:cacheprovider "--junitxml=$junit" tests)
bench_cmd=(timeout "$BENCH_LIMIT_S" "$PYTHON" benchmarks/gpu_check.py "--junit=$junit" "--budget-s=$BENCH_BUDGET_S"
           "--out=$work")

if [[ $dry_run -eq 1 ]]; then
    echo "gpu_check --dry-run: with a CUDA GPU visible to $PYTHON it would run, from $ROOT"
    echo "(PYTHONPATH=$PYTHONPATH):"
    echo "+ $PYTHON -c 'import torch; torch.cuda.is_available()'    # False: stop here with a message, exit 0"
    printf '+'; printf ' %q' "${tests_cmd[@]}"; echo
    printf '+'; printf ' %q' "${bench_cmd[@]}"; printf ' | tee %q\n' "$work/gpu_check.md"
    echo
    echo "The tests that 'pytest -m cuda' selects:"
    "$PYTHON" -m pytest -m cuda --collect-only -q -p no:cacheprovider tests 2>&1 | grep '::' \
        || echo "(could not list them with $PYTHON)"
    echo
    "$PYTHON" benchmarks/gpu_check.py --dry-run "--junit=$junit" "--budget-s=$BENCH_BUDGET_S" \
        || echo "(could not list the measurements with $PYTHON)"
    exit 0
fi

set +e
torch_info="$("$PYTHON" -c 'import sys, torch
print(f"torch {torch.__version__}, CUDA build", torch.version.cuda or "none")
sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null)"
found=$?
set -e
if [[ $found -eq 3 ]]; then
    echo "gpu_check: skipped: no CUDA GPU is visible to $PYTHON ($torch_info). Everything it checks needs" \
         "one; run it on a machine with a GPU ('bash benchmarks/gpu_check.sh --dry-run' shows what it would run)."
    exit 0
elif [[ $found -ne 0 ]]; then
    echo "gpu_check: $PYTHON cannot import torch; set PYTHON to the interpreter of a CUDA build of torch" >&2
    exit 2
fi

mkdir -p "$work"
start=$SECONDS
echo "gpu_check: $torch_info, $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"
echo "## 1. pytest -m cuda (at most ${TEST_LIMIT_S} s)"
tests_status=0
"${tests_cmd[@]}" || tests_status=$?
echo
echo "## 2. measurements (at most ${BENCH_LIMIT_S} s)"
bench_status=0
"${bench_cmd[@]}" | tee "$work/gpu_check.md" || bench_status=$?
echo "gpu_check: $((SECONDS - start)) s in all; tests exit status $tests_status, measurements $bench_status"
[[ -n "$out_dir" ]] && echo "gpu_check: results kept in $out_dir"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]] || exit 1
