#!/usr/bin/env bash
# One prepared device check for a lent H100/H200 (about 6-8 minutes, at most 9.5: call the
# device tool with timeout_s 600):
#   1. pytest -m gpu (tests/trainer/test_gpu.py): bf16 forward/backward of ARM and MDM on
#      CUDA, and DeepSpeed ZeRO-2 bf16 steps on NCCL;
#   2. 1028M ARM and MDM (bf16, micro-batch 8 x accumulation 2, seq_len 2048, vocab 32000,
#      ZeRO-2, chunked loss, synthetic tokens), compiled and eager: tokens/s, MFU against the
#      bf16 dense peak, MDM/ARM step-time ratio, peak memory (AC=K env: activation
#      checkpointing every K-th block if 80 GB is not enough);
#   3. 170M: chunked vs plain loss and per-row fused vs dense-mask attention for cut rows;
#   4. sampling speed (benchmarks/sampling_bench.py): 113M, vocab 32000, bf16, prompt 64,
#      L = 256, batch 1 and 16, low-confidence MDM at L..L/8 steps vs ARM KV cache;
#   5. one markdown table of all of it (benchmarks/gpu_table.py) -> $OUT/table.md, the
#      sampling numbers as its "MDM vs ARM sampling" section.
# Time caps: 100 + 330 + 85 + 45 s.
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
    "$PY" benchmarks/trainer_bench.py --tiny --device cpu --skip-plain --compile-compare \
        --loss-compare --json "$OUTDIR/bench_dry.json" 2>&1 | grep -v -i warning
    status=${PIPESTATUS[0]}
    "$PY" benchmarks/sampling_bench.py --smoke --batch 1,2 --strategy low-confidence \
        --json "$OUTDIR/sampling_dry.json" || status=1
    "$PY" benchmarks/gpu_table.py "$OUTDIR/bench_dry.json" "$OUTDIR/sampling_dry.json" || status=1
    exit "$status"
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', \
deepspeed.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())" || {
    echo "DeepSpeed or CUDA missing: carry the wheels described at the top of this script"
    exit 3
}

echo "== pytest -m gpu"
timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/trainer/test_gpu.py 2>&1 |
    tee "$OUTDIR/pytest_gpu.log"
status_tests=${PIPESTATUS[0]}

# The issue's anchor: 1028M, bf16, micro-batch 8 with accumulation (x2), seq 2048, ZeRO-2,
# chunked loss; compiled (the CUDA default) and eager, ARM and MDM: 4 engines of ~20-60 s each.
echo "== 1028M: ARM vs MDM, compiled vs eager (bf16, micro 8 x accum 2, seq 2048, ZeRO-2)"
timeout 330 "$PY" benchmarks/trainer_bench.py --device cuda --models 1028M:8 \
    --seq-len 2048 --vocab 32000 --accum 2 --precision bf16 --zero-stage 2 \
    --compile true --compile-compare --warmup 3 --steps 6 --skip-plain --loader-rows 4096 \
    --activation-checkpointing "${AC:-0}" \
    --json "$OUTDIR/bench_1b.json" 2>&1 | grep -v -i warning | tee "$OUTDIR/bench_1b.log"
status_1b=${PIPESTATUS[0]}

echo "== 170M: chunked vs plain loss, cut rows fused vs dense mask (eager)"
timeout 85 "$PY" benchmarks/trainer_bench.py --device cuda --models 170M:8 \
    --seq-len 2048 --vocab 32000 --accum 1 --precision bf16 --zero-stage 2 \
    --compile false --loss-compare --cut-compare --warmup 2 --steps 5 --skip-plain \
    --loader-rows 4096 --json "$OUTDIR/bench_170m.json" 2>&1 | grep -v -i warning |
    tee "$OUTDIR/bench_170m.log"
status_170m=${PIPESTATUS[0]}

# The MDM's speed claim (issue 9): tokens/s at L, L/2, L/4, L/8 steps vs ARM KV-cache decoding
# of the same length and batch; low-confidence only and 3 repeats to fit 45 s (the JSON is
# written after each batch size, so batch 1 survives the cap).
echo "== sampling: MDM steps vs ARM KV cache (113M, bf16, prompt 64, L 256, batch 1 and 16)"
timeout 45 "$PY" benchmarks/sampling_bench.py --device cuda --dtype bf16 --model 113M \
    --vocab 32000 --seq-len 512 --prompt 64 --length 256 --batch 1,16 \
    --strategy low-confidence --repeats 3 --threads 0 --json "$OUTDIR/sampling.json" 2>&1 |
    tee "$OUTDIR/sampling.log"
status_sampling=${PIPESTATUS[0]}

echo "== table (goals: MFU >= 45% at 1028M, stretch 55%; MDM/ARM step time <= 1.05)"
"$PY" benchmarks/gpu_table.py "$OUTDIR/bench_1b.json" "$OUTDIR/bench_170m.json" \
    "$OUTDIR/sampling.json" | tee "$OUTDIR/table.md"

echo "== exit codes: pytest=$status_tests bench_1b=$status_1b bench_170m=$status_170m" \
    "sampling=$status_sampling"
exit $((status_tests != 0 || status_1b != 0 || status_170m != 0 || status_sampling != 0))
