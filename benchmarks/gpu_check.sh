#!/usr/bin/env bash
# One command for a GPU machine: npyrnn's suite on real CuPy, the float64 parity tests, a short CLI
# training run and generation, then benchmarks/bench_gpu.py and graph_experiment.py; a summary and the
# JSON go into OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR              # from the checkout; about 8 minutes at most
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR    # what would run, and whether this machine can
#   bash benchmarks/gpu_check.sh --stand-in OUTDIR   # test this script on a CPU with ../shared/tools/fakecupy
#
# Needs CUDA, CuPy, torch (a CUDA build), numpy and pytest; nothing is installed and nothing is
# downloaded: the checkout runs with PYTHONPATH=$PWD, the corpus comes from NPYRNN_DATA_DIR (default
# ../shared/data). Every step runs under `timeout`; a failed step is reported and the next one runs.
# Exit code: 0 all steps passed, 1 a step failed or timed out, 3 no GPU here (nothing run), 2 bad usage.
#
# Environment: NPYRNN_DATA_DIR; GPU_CHECK_PYTEST_ARGS (narrow the suite step, e.g. a test file);
# GPU_CHECK_BENCH_ARGS (extra bench_gpu.py flags, e.g. --quick).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--stand-in] OUTDIR" >&2; exit 2; }
DRY=0; STAND_IN=0; OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --stand-in) STAND_IN=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown flag $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || usage

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT/logs" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NPYRNN_DATA_DIR="${NPYRNN_DATA_DIR:-$ROOT/../shared/data}"
export NPYRNN_BACKEND=cupy
START=$(date +%s)

# Time limits in seconds; their sum (with the checks) stays under 8 minutes.
T_KERNELS=70; T_PARITY=70; T_SUITE=140; T_CLI=40; T_GENERATE=20; T_BENCH=90; T_GRAPH=50

{
  echo "# npyrnn GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
  else
    echo "- GPU: nvidia-smi not found"
  fi
  echo "- NPYRNN_DATA_DIR: $NPYRNN_DATA_DIR"
} > "$SUMMARY"

# Versions, and which optional packages are missing (none is needed to train on a local corpus).
"$PY" - >> "$SUMMARY" 2>&1 <<'EOF'
import importlib, importlib.util, platform
print(f"- python {platform.python_version()}")
for name in ("numpy", "cupy", "torch", "pytest"):
    try:
        module = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" (CUDA {module.version.cuda}, available: {module.cuda.is_available()})"
        if name == "cupy" and hasattr(module, "_fake"):
            extra = " (the CPU stand-in fakecupy)"
        print(f"- {name} {getattr(module, '__version__', '?')}{extra}")
    except Exception as exc:
        print(f"- {name}: cannot import ({exc.__class__.__name__}: {exc})")
optional = ["safetensors", "matplotlib", "tqdm", "hypothesis", "pooch", "platformdirs", "pytest_timeout"]
missing = [n for n in optional if importlib.util.find_spec(n) is None]
print(f"- optional packages missing: {', '.join(missing) or 'none'}")
EOF

# Can this machine run the check? (bench_gpu.py's own test, so both say the same.)
REASON="$("$PY" -c "
import sys; sys.path.insert(0, '$ROOT')
from benchmarks.bench_gpu import why_not
print(why_not(stand_in=$STAND_IN == 1) or '')" 2>&1 | tail -n 1)"
if [ -n "$REASON" ] && [ "$DRY" = 1 ]; then
  { echo; echo "No GPU here ($REASON): on this machine the steps below would not run."; } >> "$SUMMARY"
elif [ -n "$REASON" ]; then
  { echo; echo "## no GPU"; echo; echo "$REASON"; echo; echo "Nothing was run."; } >> "$SUMMARY"
  echo "gpu_check: no GPU: $REASON (summary: $SUMMARY)" >&2
  exit 3
fi

PYTEST_TIMEOUT=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST_TIMEOUT=(--timeout=60); fi
# The suite step spreads over CPU cores where pytest-xdist is installed (a GPU machine has many;
# the tests' CuPy arrays are small, so the GPU is shared without trouble).
WORKERS=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  WORKERS=(-n "${GPU_CHECK_WORKERS:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}")
fi
# JAX (the CPU peer of bench_train.py) stays on the CPU: it would otherwise take most of the GPU's memory.
export JAX_PLATFORMS=cpu
CLI_HIDDEN=512; CLI_EPOCHS=30
BENCH=(benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json")
if [ "$STAND_IN" = 1 ]; then
  CLI_HIDDEN=16; CLI_EPOCHS=2; BENCH+=(--stand-in --quick)
fi
# shellcheck disable=SC2206
BENCH+=(${GPU_CHECK_BENCH_ARGS:-})
# shellcheck disable=SC2206
SUITE_ARGS=(${GPU_CHECK_PYTEST_ARGS:-})

{ echo; echo "| step | result | seconds | limit |"; echo "|---|---|---|---|"; } >> "$SUMMARY"
FAILED=0
# step NAME LIMIT COMMAND...: run under timeout, log to OUT/logs/NAME.log, add a row to the summary
step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUT/logs/$name.log" t0 rc result
  echo "\$ $*" > "$log"
  if [ "$DRY" = 1 ]; then
    echo "| $name | dry run: \`$*\` | - | $limit |" >> "$SUMMARY"; return 0
  fi
  echo "gpu_check: $name (limit ${limit}s) ..." >&2
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) result="pass" ;;
    124|137) result="TIMEOUT"; FAILED=1 ;;
    *) result="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  echo "| $name | $result | $(( $(date +%s) - t0 )) | $limit |" >> "$SUMMARY"
  [ "$result" = pass ] || { echo; echo "last lines of $name.log:"; tail -n 15 "$log"; } >> "$OUT/failures.md"
  return 0
}

rm -f "$OUT/failures.md"
# The fused kernels first: each is compiled, probed against its array twin, and compared with the
# plain path; a compile failure would otherwise fall back silently. The log ends with their status.
step kernels "$T_KERNELS" "$PY" -m pytest -q -x -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" tests/test_kernels.py -rs
[ "$DRY" = 1 ] || "$PY" -c "import cupy; from npyrnn.nn import kernels; kernels.prepare(cupy, 'float32'); \
kernels.prepare(cupy, 'float64'); print('fused kernels:', kernels.status())" >> "$OUT/logs/kernels.log" 2>&1 || true
# The float64 parity tests on CuPy (gradients and training against torch autograd) and the host-sync
# test first; the suite step runs every other test.
PARITY_FILES=(tests/test_rnn.py tests/test_models_train.py tests/test_losses_optim.py tests/test_host_syncs.py)
PARITY_K="(cupy and (autograd or parity or follows or matches_torch)) or sync"
step parity "$T_PARITY" "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" "${PARITY_FILES[@]}" \
  -k "$PARITY_K"
# Not what tests the packaging and the documentation's tooling: the installed console script (the
# check runs from the checkout, nothing installed), the mkdocs build and the notebook's Jupyter kernel;
# a GPU machine need not have them. No -x here: every failure is listed.
step suite "$T_SUITE" "$PY" -m pytest -q --maxfail=30 -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" "${WORKERS[@]}" \
  --ignore=tests/test_notebook.py -k "not ($PARITY_K) and not mkdocs_build and not console_script" "${SUITE_ARGS[@]}"
step cli_train "$T_CLI" "$PY" -m npyrnn train --corpus timemachine --hidden "$CLI_HIDDEN" --epochs "$CLI_EPOCHS" \
  --out "$OUT/run" --overwrite --quiet
step cli_generate "$T_GENERATE" "$PY" -m npyrnn generate --checkpoint "$OUT/run/model.safetensors" --prefix "time traveller" \
  --length 50 --no-stream
step bench "$T_BENCH" "$PY" "${BENCH[@]}"
# The CUDA-graph step (--cuda-graph) against eager npyrnn and cuDNN, its bits checked against eager first.
GRAPH=(benchmarks/graph_experiment.py --pairs 2 --json "$OUT/graph.json")
[ "$STAND_IN" = 1 ] && GRAPH=(-c "print('graph: skipped on the stand-in (no CUDA graphs)')")
step graph "$T_GRAPH" "$PY" "${GRAPH[@]}"

{
  echo
  if [ "$DRY" = 0 ]; then
    echo "Whole check: $(( $(date +%s) - START )) s."
    [ -f "$OUT/run/summary.json" ] && { echo; echo "CLI run: $(tail -n 1 "$OUT/logs/cli_train.log")"; }
    [ -s "$OUT/logs/cli_generate.log" ] && echo "Generated: $(tail -n 1 "$OUT/logs/cli_generate.log")"
    if [ -f "$OUT/bench_gpu.json" ]; then
      echo; echo "## bench_gpu.py"; echo
      grep -E '^\||^GPU' "$OUT/logs/bench.log" || echo "(no table: see logs/bench.log)"
    fi
    if [ -f "$OUT/graph.json" ]; then
      echo; echo "## graph_experiment.py (--cuda-graph)"; echo
      grep -E '^\|' "$OUT/logs/graph.log" || echo "(no table: see logs/graph.log)"
    fi
    [ -f "$OUT/failures.md" ] && { echo; echo "## failures"; cat "$OUT/failures.md"; }
  fi
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
