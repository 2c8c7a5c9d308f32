#!/usr/bin/env bash
# Full-size GLM-4-Voice figures on one CUDA GPU with random weights, in one run of a few
# minutes. Parts, in this order (PARTS="..." picks some):
#   tests     the CUDA-only tests (graph replays and the fused step against plain calls)
#   lm        LM prefill and decode steps: dynamic cache, static cache, CUDA graphs, each
#             static kind fused and through transformers' layers (-unfused)
#             (LM_STEPS=... to choose; LM_MODES="" skips the plain decode) at batch 1, 4, 16
#   profile   where a graphed batch-1 LM step's time goes: device busy vs. wall, top kernels
#   engine    the engine's first audio per stage and 1..16 concurrent conversations
#   decoder   decoder cost per block along an answer, reference vs. fast
#   warm-up   start-up warm-up and the first turn of a fresh process with and without it
#   compile   the torch.compile decode step (minutes of compilation)
# Each part has its own time limit and log in OUT_DIR, so one that fails or overruns does
# not cost the others. The limits add up to about 16 minutes; where one command may run for
# less, split it, e.g. PARTS="tests lm profile" then PARTS="engine decoder".
#
#   bash bench/gpu_suite.sh [OUT_DIR]       (PYTHON=... to choose the interpreter)
set -u
out=${1:-${OUT:-bench-gpu-out}}
mkdir -p "$out"
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
parts=" ${PARTS:-tests lm profile engine decoder warm-up compile} "
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ $parts == *" $name "* ]] || return 0
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

part tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
    tests/test_lm_fused_step.py
part lm 150 "$py" -m bench.bench_lm --full --modes "${LM_MODES-bf16}" \
    --decode-steps "${LM_STEPS:-dynamic,static,graphs,graphs-unfused}" --json "$out/lm.json"
part profile 90 "$py" -m bench.bench_lm --full --modes "" --decode-steps "" \
    --no-prefill-together --no-conversation --profile "${PROFILE_STEP:-graphs}" \
    --json "$out/profile.json"
part engine 280 "$py" -m bench.bench_glm4voice --full --sections stages,concurrency \
    --repeats 1 --json "$out/engine.json"
part decoder 120 "$py" -m bench.bench_glm4voice --full --sections decoder --repeats 1 \
    --decoder-tokens 80 --json "$out/decoder.json"
part warm-up 100 "$py" -m bench.bench_glm4voice --full --sections warm-up --repeats 1 \
    --json "$out/warm-up.json"
part compile 100 "$py" -m bench.bench_lm --full --modes "" --decode-steps compile \
    --batches 1 --no-prefill-together --no-conversation --json "$out/compile.json"
