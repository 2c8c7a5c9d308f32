#!/usr/bin/env bash
# Full-size GLM-4-Voice figures on one CUDA GPU with random weights, in one run of a few
# minutes: LM decode steps (dynamic cache, static cache, CUDA graphs), the engine's first
# audio per stage, 1..16 concurrent conversations, decoder cost per block, start-up warm-up,
# and last (when there is time) the torch.compile step. Each part has its own time limit and
# log, so one that fails or overruns does not cost the others.
#
#   bash bench/gpu_suite.sh [OUT_DIR]       (PYTHON=... to choose the interpreter)
set -u
out=${1:-${OUT:-bench-gpu-out}}
mkdir -p "$out"
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -v -E "^(WARNING|INFO|DEBUG) " "$out/$name.log" | tail -n 60
    echo "=== $name: exit $rc after $((SECONDS - began)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '|', torch.cuda.get_device_name())" || exit 1

part lm 120 "$py" -m bench.bench_lm --full --modes bf16 --json "$out/lm.json"
part engine 200 "$py" -m bench.bench_glm4voice --full --sections stages,concurrency,decoder \
    --repeats 1 --json "$out/engine.json"
part warm-up 100 "$py" -m bench.bench_glm4voice --full --sections warm-up --repeats 1 \
    --json "$out/warm-up.json"
part compile 100 "$py" -m bench.bench_lm --full --modes "" --decode-steps compile \
    --batches 1 --json "$out/compile.json"
