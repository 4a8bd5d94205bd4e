#!/usr/bin/env bash
# The GPU proof of the product path, as one command for a lent GPU machine (~10 min on one H200):
# README's default command, the whole pipeline (scripts/pipeline.sh), every stage in bf16-mixed with
# fused AdamW (scripts/every_stage.sh), then bench/gpu_check.sh. Each step's wall time and its last
# lines go to OUT/session.txt; a failing step is reported and the next one still runs.
#   bash bench/gpu_session.sh [OUT_DIR]
# A machine without hydra-core/omegaconf/antlr4 (the device image) needs them installed from wheels
# first; logger=csv avoids wandb. On a CPU, for a dry run of the script itself:
#   DEFAULT_STEPS=5 MODEL=nano PRETRAIN_STEPS=10 SFT_STEPS=10 REWARD_STEPS=5 PPO_STEPS=2 STEPS=3 \
#     bash bench/gpu_session.sh /tmp/gpu-session        (gpu_check.sh is skipped without nvidia-smi)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu-session}
mkdir -p "$OUT"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
REPORT="$OUT/session.txt"
: > "$REPORT"
failed=0

step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, append wall time and tail to the report
  local name=$1 start=$SECONDS rc
  shift
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  { echo "== $name: exit $rc, $((SECONDS - start)) s"; tail -n 12 "$OUT/$name.log"; echo; } | tee -a "$REPORT"
  [ "$rc" -eq 0 ] || failed=1
}

{ date -u; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; echo; } | tee -a "$REPORT"
steps=()
[ -n "${DEFAULT_STEPS:-}" ] && steps=(trainer.max_steps="$DEFAULT_STEPS")
step default python train.py logger=csv trainer.progress_bar=plain "${steps[@]}" hydra.run.dir="$OUT/default"
step pipeline scripts/pipeline.sh "$OUT/pipeline"
step every_stage scripts/every_stage.sh "$OUT/every-stage"
if command -v nvidia-smi > /dev/null; then
  step gpu_check bench/gpu_check.sh "$OUT/bench"
else
  echo "== gpu_check: skipped (no nvidia-smi)" | tee -a "$REPORT"
fi
exit "$failed"
