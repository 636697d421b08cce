#!/usr/bin/env bash
# One prepared device check for a lent H100/H200 (about 3-5 minutes, at most 8):
#   1. pytest -m gpu (tests/trainer/test_gpu.py): bf16 forward/backward of ARM and MDM on
#      CUDA, and DeepSpeed ZeRO-2 bf16 steps on NCCL;
#   2. ARM and MDM throughput at 170M and 1028M (ZeRO-2, bf16, seq_len 2048, vocab 32000,
#      synthetic tokens): tokens/s, MFU against the bf16 dense peak, MDM/ARM step-time ratio.
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: CPU, tiny sizes, seconds
#
# Logs and JSON go to $OUT (the device tool's output folder) or /tmp/gpu_check_out.
#
# The device image has torch but not DeepSpeed (nor hjson, pydantic). Before the device call,
# run `bash benchmarks/gpu_wheels.sh` HERE: it builds/fetches them into .whl/ (git-ignored via
# .git/info/exclude); then call the device tool with carry [".whl"] and this script installs
# them with --target /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUTDIR="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUTDIR"
PY="${PY:-python3}"
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $DRY == 0 && -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DRY == 1 ]]; then
    echo "== dry run (CPU, tiny)"
    "$PY" benchmarks/trainer_bench.py --tiny --device cpu --skip-plain \
        --json "$OUTDIR/bench_dry.json" 2>&1 | grep -v -i warning
    exit "${PIPESTATUS[0]}"
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', \
deepspeed.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())" || {
    echo "DeepSpeed or CUDA missing: carry the wheels described at the top of this script"
    exit 3
}

echo "== pytest -m gpu"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/trainer/test_gpu.py 2>&1 |
    tee "$OUTDIR/pytest_gpu.log"
status_tests=${PIPESTATUS[0]}

echo "== throughput: ARM vs MDM, ZeRO-2 bf16, seq_len 2048"
timeout 330 "$PY" benchmarks/trainer_bench.py --device cuda --models 170M:8,1028M:4 \
    --seq-len 2048 --vocab 32000 --accum 1 --precision bf16 --zero-stage 2 \
    --warmup 3 --steps 10 --skip-plain --loader-rows 8192 \
    --json "$OUTDIR/bench_gpu.json" 2>&1 | grep -v -i warning | tee "$OUTDIR/bench_gpu.log"
status_bench=${PIPESTATUS[0]}

echo "== exit codes: pytest=$status_tests bench=$status_bench"
exit $((status_tests != 0 || status_bench != 0))
