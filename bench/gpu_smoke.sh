#!/usr/bin/env bash
# CUDA smoke test of every training stage, for a machine with one NVIDIA GPU (fits in ~10 minutes).
#
# Tiny models (hidden 128, 2 layers) on the bundled demo data, 3 optimizer steps a stage:
# pretrain (also --packing 1, --use_moe 1), full SFT, DPO, LoRA, reasoning distillation and
# white-box distillation, each launched with `torchrun --nproc_per_node 1`, then the chain
# again with --compile 1; then bench_gpu.py --quick and bench_gpu_busy.py. Logs, metrics files and a summary go to
# $OUT (default: ./gpu_smoke_out): summary.txt, and every log and metrics file in logs.tar.gz
# (the device tool brings back at most 8 files). Exit code 0 only if every run passed.
#
#     bash bench/gpu_smoke.sh                      # from the repository root
#     OUT=/tmp/smoke bash bench/gpu_smoke.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_smoke_out}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$SUMMARY" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$SUMMARY" 2>&1
FAILED=0
SIZES="--hidden_size 128 --num_hidden_layers 2 --max_seq_len 128 --max_steps 3 --log_interval 1 --save_interval 100"

run() {  # run NAME SCRIPT FLAGS...: one stage under torchrun, log to $OUT/NAME.log
    local name=$1 script=$2; shift 2
    local start=$SECONDS
    if PYTHONUNBUFFERED=1 $PY -m torch.distributed.run --nproc_per_node 1 --master_port 29517 "trainer/$script" \
        $SIZES --out_dir "$RUN_DIR/out" --checkpoint_dir "$RUN_DIR/checkpoints" "$@" > "$LOGS/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s): $(grep -o 'tokens/s:[0-9]*' "$LOGS/$name.log" | tail -1) $(grep -o 'mfu:[0-9.]*%*' "$LOGS/$name.log" | tail -1)" | tee -a "$SUMMARY"
    else
        echo "FAIL $name ($((SECONDS - start)) s): see $name.log" | tee -a "$SUMMARY"
        tail -20 "$LOGS/$name.log" >> "$SUMMARY"
        FAILED=1
    fi
}

chain() {  # chain SUFFIX FLAGS...: every stage, each from the previous one's weights
    local suffix=$1; shift
    RUN_DIR=$(mktemp -d)
    run "pretrain$suffix" train_pretrain.py --batch_size 16 --accumulation_steps 2 "$@"
    run "pretrain_packing$suffix" train_pretrain.py --batch_size 16 --packing 1 --out_dir "$RUN_DIR/packed" "$@"
    run "pretrain_moe$suffix" train_pretrain.py --batch_size 16 --use_moe 1 "$@"
    run "full_sft$suffix" train_full_sft.py --batch_size 16 "$@"
    run "dpo$suffix" train_dpo.py --batch_size 4 "$@"
    run "lora$suffix" train_lora.py --batch_size 8 --lora_name lora_identity "$@"
    run "reason$suffix" train_distill_reason.py --batch_size 8 "$@"
    run "distillation$suffix" train_distillation.py --batch_size 8 --teacher_hidden_size 128 --teacher_num_hidden_layers 2 "$@"
    for f in "$RUN_DIR"/out/*_metrics.jsonl; do [ -e "$f" ] && cp "$f" "$LOGS/$(basename "${f%.jsonl}")$suffix.jsonl"; done
    rm -rf "$RUN_DIR"
}

chain "" 
chain "_compile" --compile 1
start=$SECONDS
if PYTHONUNBUFFERED=1 $PY bench/bench_gpu.py --quick --compile 0 --stages pretrain --out "$OUT/gpu_quick.json" > "$LOGS/bench_quick.log" 2>&1; then
    echo "PASS bench_gpu --quick ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
else
    echo "FAIL bench_gpu --quick: see bench_quick.log" | tee -a "$SUMMARY"; tail -20 "$LOGS/bench_quick.log" >> "$SUMMARY"; FAILED=1
fi
tail -8 "$LOGS/bench_quick.log" >> "$SUMMARY"
start=$SECONDS
if PYTHONUNBUFFERED=1 $PY bench/bench_gpu_busy.py --steps 40 --out "$OUT/gpu_busy.json" > "$LOGS/bench_busy.log" 2>&1; then
    echo "PASS bench_gpu_busy ($((SECONDS - start)) s): $(grep -o '"busy": [0-9.]*' "$OUT/gpu_busy.json" | tr '\n' ' ')" | tee -a "$SUMMARY"
else
    echo "FAIL bench_gpu_busy: see bench_busy.log" | tee -a "$SUMMARY"; tail -20 "$LOGS/bench_busy.log" >> "$SUMMARY"; FAILED=1
fi
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
exit $FAILED
