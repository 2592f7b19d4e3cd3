#!/bin/bash
# The GPU checks, in one short run (see docs/performance.md, "On a GPU", for the figures it gave):
# the CUDA model/engine tests, the model and engine tests with the server's default
# strategy (auto -> cuda fp16 there), bench/forward.py on cuda fp16/bf16/fp32 and a
# short bench/throughput.py on cuda fp16. Logs go to $OUT (or /tmp/cuda-check).
#
#   bash bench/cuda_check.sh            # where .venv has torch with CUDA
#   PY=python3 bash bench/cuda_check.sh # the device machine: its python3 holds torch;
#                                       # the rest of the stack comes as wheels in .whl/
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $?"
    tail -n 25 "$OUT/$name.log"
}

step cuda-tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_rwkv7.py tests/test_engine.py
step default-strategy-tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_checkpoints.py tests/test_states.py tests/test_chat.py
step forward 90 $PY bench/forward.py --device cuda --precisions fp16,bf16,fp32 --batches 1,16,32,128 --repeats 3 \
    --wait-quiet 0
step throughput 130 $PY bench/throughput.py --strategy "cuda fp16" --users 1,16,32 --tokens 128 --baseline-runs 1 \
    --prefill-runs 2
