#!/usr/bin/env bash
# One prepared device check for a lent H100/H200, over within 480 s (ask the device tool for
# timeout_s 540; benchmarks/gpu_wheels.sh prints the call):
#   1. pytest -m gpu (tests/trainer/test_gpu.py): bf16 forward/backward of ARM and MDM on
#      CUDA, DeepSpeed ZeRO-2 bf16 steps on NCCL, compiled/chunked/checkpointed = eager;
#   2. 1028M ARM and MDM (bf16, micro-batch 8 x accumulation 2, seq_len 2048, vocab 32000,
#      ZeRO-2, chunked loss, synthetic tokens), variants compiled (the reference) and eager:
#      tokens/s, MFU in two counts, MDM/ARM step time, peak memory (AC=K env: activation
#      checkpointing every K-th block if 80 GB is not enough);
#   3. 170M: the levers, each a variant against base (ZeRO-2, fused AdamW, SDPA's own kernel
#      choice, chunked loss): plain loss, the plain one-GPU engine (engine=plain, zero_stage=0),
#      unfused AdamW, the cuDNN attention kernel; per-row fused vs dense-mask attention for cut
#      rows; the loader's rows/s (every MDM run cuts one row in its first warm-up step, so the
#      cut-row path is compiled before timing);
#   4. sampling speed (benchmarks/sampling_bench.py): 113M, vocab 32000, bf16, prompt 64,
#      L = 256, batch 1 and 16, low-confidence MDM at L..L/8 steps vs ARM KV cache;
#   5. one markdown report of all of it (benchmarks/gpu_table.py) -> $OUT/table.md.
#
# Nothing is lost to one failure: each section's cap is taken from what is left of the global
# deadline (480 s, CHECK_DEADLINE_S), so a slow section shortens the later ones instead of the
# device tool killing the call; every benchmark rewrites its JSON after each variant and
# records an OOM, NCCL or compile error (or its own time limit) in the JSON and goes on; a
# benchmark process that dies outright is restarted with --resume, which records the variant
# it died in as a crash and runs the rest. TORCH_LOGS=recompiles,graph_breaks is on and all
# output goes to $OUT/check.log. $OUT ends with at most 6 files (the tool returns 8):
# check.log, pytest.xml, bench_1b.json, bench_170m.json, sampling.json, table.md; rebuild the
# table here with `python benchmarks/gpu_table.py <files>`. Exit status 0 when everything was
# measured (or failed only where MASKSCALE_BENCH_FAIL injected it), else 1.
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: CPU, tiny sizes, every branch, < 1 min
#
# The dry run injects failures unless MASKSCALE_BENCH_FAIL is set (set it empty for none): an
# OOM and a compile error in the first trainer run, a crash (the process dies) in the second,
# an NCCL error in sampling. Logs and JSON go to $OUT (the device tool's output folder) or
# /tmp/gpu_check_out.
#
# The device image has torch but not DeepSpeed (nor hjson, pydantic). Before the device call
# run `bash benchmarks/gpu_wheels.sh` HERE: it puts them into .whl/ (git-ignored); the call
# carries [".whl"] and this script installs them with --target /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUTDIR="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/{check.log,pytest.xml,bench_1b.json,bench_170m.json,sampling.json,table.md}
exec > >(tee -a "$OUTDIR/check.log") 2>&1
TEE_PID=$!
PY="${PY:-python3}"
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS="${TORCH_LOGS-recompiles,graph_breaks}"
DEADLINE="${CHECK_DEADLINE_S:-480}"
(( DRY )) && DEADLINE="${CHECK_DEADLINE_S:-240}"  # ~45 s on 2 idle cores
if (( DRY )); then
    export OMP_NUM_THREADS=1  # 2 shared cores: one thread each is 30x faster than contention
    export MASKSCALE_BENCH_FAIL="${MASKSCALE_BENCH_FAIL-*/eager/arm:oom,*/eager/mdm:compile,*/plain-loss/mdm:crash,sampling/batch2:nccl}"
fi

# cap PLANNED FLOOR_OF_LATER: this section's time limit, from what is left of the deadline
# after the later sections' floors (and 10 s for the table); 0 = too little left to start.
cap() {
    local left=$((DEADLINE - SECONDS - $2 - 10))
    local c=$(( $1 < left ? $1 : left ))
    (( c >= 15 )) && echo "$c" || echo 0
}
section() { echo; echo "== [$SECONDS s of $DEADLINE] $*"; }

# bench NAME CAP JSON ARGS...: trainer_bench.py under a time limit; a run that died (not by
# the limit) while a variant was running is resumed, that variant recorded as a crash.
bench() {
    local name=$1 limit=$2 json=$3 rc=0 tries=0 resume=()
    shift 3
    local end=$((SECONDS + limit))
    while :; do
        local left=$((end - SECONDS))
        (( left < 10 )) && { echo "$name: out of time"; return 124; }
        timeout -k 10 "$left" "$PY" benchmarks/trainer_bench.py "$@" --json "$json" \
            --time-limit $((left > 40 ? left - 20 : left / 2)) "${resume[@]}"
        rc=$?
        (( rc == 0 || rc == 124 || rc == 137 || ++tries >= 3 )) && return "$rc"
        grep -q '"status": "running"' "$json" 2>/dev/null || return "$rc"
        echo "$name: the benchmark died (exit $rc) in a variant: resuming after it"
        resume=(--resume --previous-exit "$rc")
    done
}

section "device and software"
if (( ! DRY )) && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null ||
    echo "no nvidia-smi"
"$PY" - <<'PYEOF'
import sys
sys.modules.setdefault("mlflow", None)  # as in the benchmarks: DeepSpeed's optional import
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as exc:
    print(f"DeepSpeed does not import ({exc!r}): the trainer sections will fail; carry .whl")
PYEOF
# Planned caps and the floors later sections keep; the real ones sum to 440 s with setup.
T_TESTS=75 T_1B=205 T_170M=90 T_SAMPLING=45 F_1B=60 F_170M=30 F_SAMPLING=20
(( DRY )) && T_TESTS=40 T_1B=60 T_170M=80 T_SAMPLING=40 F_1B=20 F_170M=30 F_SAMPLING=15
if (( DRY )); then
    DEV=(--device cpu --precision fp32 --peak-tflops 1 --warmup 1 --steps 2 --vocab 256)
    ONE=(--models tiny-0.3M:2 --seq-len 32 --accum 2 --loss-chunk 32 --compile false)
    TWO=(--models tiny-0.3M:2 --seq-len 32 --accum 1 --loss-chunk 32 --loader-rows 512)
    SAMPLING=(--smoke --batch 1,2 --strategy low-confidence)
    LEVERS=base,plain-loss,plain-engine,math  # cuDNN does not exist on CPU
else
    DEV=(--device cuda --precision bf16 --zero-stage 2 --vocab 32000)
    ONE=(--models 1028M:8 --seq-len 2048 --accum 2 --compile true --warmup 3 --steps 6
         --activation-checkpointing "${AC:-0}")
    TWO=(--models 170M:8 --seq-len 2048 --accum 1 --compile false --warmup 2 --steps 5
         --loader-rows 4096)
    SAMPLING=(--device cuda --dtype bf16 --model 113M --vocab 32000 --seq-len 512 --prompt 64
              --length 256 --batch 1,16 --strategy low-confidence --repeats 3 --threads 0)
    LEVERS=base,plain-loss,plain-engine,unfused,cudnn
fi

c=$(cap $T_TESTS $((F_1B + F_170M + F_SAMPLING)))
section "pytest -m gpu (cap ${c} s)"
status_tests=124
if (( c )); then
    timeout -k 10 "$c" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        --junitxml="$OUTDIR/pytest.xml" tests/trainer/test_gpu.py
    status_tests=$?
    (( status_tests == 5 )) && status_tests=0  # no test collected: not a failure of the check
fi

c=$(cap $T_1B $((F_170M + F_SAMPLING)))
section "1028M: ARM vs MDM, compiled vs eager (cap ${c} s)"
(( c )) && bench 1b "$c" "$OUTDIR/bench_1b.json" "${DEV[@]}" "${ONE[@]}" \
    --variants base,eager --skip-loader

c=$(cap $T_170M $F_SAMPLING)
section "170M: levers ($LEVERS), cut rows fused vs dense mask, loader (cap ${c} s)"
(( c )) && bench 170m "$c" "$OUTDIR/bench_170m.json" "${DEV[@]}" "${TWO[@]}" \
    --variants "$LEVERS" --cut-compare

# The MDM's speed claim (issue 9): tokens/s at L, L/2, L/4, L/8 steps vs ARM KV-cache decoding
# of the same length and batch; the JSON is written after each batch size.
c=$(cap $T_SAMPLING 0)
section "sampling: MDM steps vs ARM KV cache (cap ${c} s)"
(( c )) && timeout -k 10 "$c" "$PY" benchmarks/sampling_bench.py "${SAMPLING[@]}" \
    --json "$OUTDIR/sampling.json"

section "report (goals: MFU >= 50% at 1028M, MDM/ARM step time <= 1.05)"
"$PY" benchmarks/gpu_table.py --check "$OUTDIR/pytest.xml" "$OUTDIR/bench_1b.json" \
    "$OUTDIR/bench_170m.json" "$OUTDIR/sampling.json" > "$OUTDIR/table.md"
status_table=$?
cat "$OUTDIR/table.md"
echo "== done in $SECONDS s (deadline $DEADLINE): pytest exit $status_tests, report" \
    "$( ((status_table)) && echo 'has failures that were not injected' || echo clean)"
code=$((status_tests != 0 || status_table != 0))
exec >&- 2>&-  # let tee finish check.log before it is measured (and the caller reads it)
wait "$TEE_PID" 2>/dev/null
size=$(stat -c %s "$OUTDIR/check.log" 2>/dev/null || echo 0)
(( size > 15 * 2**20 )) && gzip -f "$OUTDIR/check.log"  # the tool returns files up to 16 MiB
exit "$code"
