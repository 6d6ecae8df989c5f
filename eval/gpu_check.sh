#!/usr/bin/env bash
# One prepared GPU check (issue 23): planned for under 8 minutes on one H200 (per-step time limits below), nothing downloaded
# (random weights of real architectures, vtc.testing.real_config). Writes everything into one folder it names:
#   eval/results/gpu/<date>_<device>/ (or --out DIR): log.txt, env.txt, kernels.json, thresholds.json,
#   bench_<model>.{csv,json,png}, sdpa.json, vllm/ (if eval/bench_vllm.py exists), summary.md.
#
#   eval/gpu_check.sh               # GPU: install, then the four steps below
#   eval/gpu_check.sh --cpu-smoke   # the same steps on tiny models on the CPU, in about a minute (CI runs it)
#
# Steps: (0) install: vtc in editable mode into the machine's python (PYTHON, default python3) without
# touching its CUDA torch (torch and triton from PyPI first if it has none); transformers pinned to constraints.txt when pip can reach it (or from wheels in
# ./.whl); flash-attn / kernels tried, optional. (1) Triton kernels vs their PyTorch references at N = 576,
# 2880, 10000, bf16 and fp32: indices equal, times, the dispatch thresholds they imply (vtc/ops.py).
# (2) TTFT and decode tok/s for llava-1.5-7b and qwen2.5-vl-7b (bf16, batch 1 and 8; unpatched vs vtc_cls,
# visionzip, fastv, todre, dart at keep 0.1/0.25/0.5), overhead vs the unpatched model fed the equally short
# input, fraction of the roofline speedup (eval/bench.py). (3) Which SDPA backend vtc's decoder loop runs (it
# passes an explicit mask) vs the unpatched path, and its cost; flash_attention_2 when installed. (4) vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n 2,17p "$0"; exit 0 ;;
        *) echo "unknown option $1 (known: --cpu-smoke, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
PIP_FAST="--retries 0 --timeout 10"  # fail fast on a machine without network
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch" 2>/dev/null; then  # a bare machine: PyPI's Linux torch is a CUDA build
    echo "installing torch and triton from PyPI (a few minutes)"
    timeout 400 "$PY" -m pip install -q torch triton || true
fi
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA torch in $PY: set PYTHON to a python whose torch sees the GPU, or run --cpu-smoke" >&2
    exit 1
fi
if [ -z "$OUT" ]; then
    if [ "$SMOKE" = 1 ]; then
        OUT=out/gpu_check_smoke
    else
        DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
        OUT="eval/results/gpu/$(date -u +%Y-%m-%d)_${DEVICE}"
    fi
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - START )) s)"; }
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the Triton kernels under the interpreter
    SMOKE_FLAG=--cpu-smoke
else
    SMOKE_FLAG=
    unset TRITON_INTERPRET  # compiled kernels, not the interpreter
    step "0. install"
    if [ -d .whl ]; then  # wheels carried to a machine without network
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/vtc-site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/vtc-site"
    fi
    WANT=$(grep '^transformers==' constraints.txt | cut -d= -f3)
    HAVE=$("$PY" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo none)
    if [ "$HAVE" != "$WANT" ]; then
        timeout 120 "$PY" -m pip install -q $PIP_FAST "transformers==$WANT" \
            || echo "WARNING: transformers $WANT not installed (have $HAVE): results are for $HAVE"
    fi
    timeout 60 "$PY" -m pip install -q $PIP_FAST --no-deps --no-build-isolation -e . \
        || echo "note: vtc not pip-installed; it runs from this checkout (PYTHONPATH)"
    for pkg in flash-attn kernels; do  # optional: flash_attention_2 in step 3
        timeout 90 "$PY" -m pip install -q $PIP_FAST --only-binary=:all: "$pkg" || echo "note: $pkg did not install"
    done
fi
"$PY" - > "$OUT/env.txt" <<'EOF'
import platform, torch, transformers
import vtc
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("transformers", transformers.__version__, "vtc", vtc.__file__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF
cat "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >> "$OUT/env.txt" || true

STATUS=0
run_step() {  # a step that fails or overruns is recorded, and the others still run
    local name=$1 limit=$2; shift 2
    step "$name"
    timeout "$limit" "$@" || { echo "STEP FAILED ($name): exit $?"; STATUS=1; }
}
run_step "1. kernels vs references" 120 "$PY" eval/gpu_check.py kernels --out "$OUT" $SMOKE_FLAG
run_step "2. prefill and decode at real size" 270 "$PY" eval/gpu_check.py speed --out "$OUT" $SMOKE_FLAG
run_step "3. attention path" 60 "$PY" eval/gpu_check.py sdpa --out "$OUT" $SMOKE_FLAG
step "4. vLLM"
if [ -f eval/bench_vllm.py ] && [ "$SMOKE" = 1 ]; then  # the CPU has no vLLM: the script must at least load
    "$PY" eval/bench_vllm.py --help > /dev/null || { echo "STEP FAILED (eval/bench_vllm.py --help)"; STATUS=1; }
elif [ -f eval/bench_vllm.py ] && "$PY" -c "import vllm" 2>/dev/null; then
    mkdir -p "$OUT/vllm"
    for model in llava-1.5-7b qwen2.5-vl-7b; do
        timeout 120 "$PY" eval/bench_vllm.py --model "$model" --out "$OUT/vllm/$model" \
            || { echo "STEP FAILED (vLLM, $model): exit $?"; STATUS=1; }
    done
else
    echo "skipped: eval/bench_vllm.py or the vllm package is missing"
fi
step "summary"
"$PY" eval/gpu_check.py summary --out "$OUT" > /dev/null
echo "done in $(( $(date +%s) - START )) s: $OUT (summary.md)"
exit $STATUS
