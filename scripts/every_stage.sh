#!/usr/bin/env bash
# Every stage through train.py, each from the checkpoint of the one before, at one precision and
# one AdamW implementation: pretrain -> sft -> reward -> ppo, reinforce, rloo, grpo.
#   scripts/every_stage.sh [OUT_DIR] [overrides for every stage...]
#   PRECISION=bf16-mixed IMPL=fused MODEL=nano STEPS=20 scripts/every_stage.sh /tmp/stages logger=csv
# Prints one line per stage (wall seconds, last logged loss) and exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-outputs/every-stage/$(date +%Y%m%d-%H%M%S)}
[ $# -gt 0 ] && shift
PRECISION=${PRECISION:-bf16-mixed}
IMPL=${IMPL:-fused}
MODEL=${MODEL:-nano}
STEPS=${STEPS:-20}
PYTHON=${PYTHON:-python}
common=(model="$MODEL" trainer.max_steps="$STEPS" trainer.precision="$PRECISION" algo.optim.impl="$IMPL"
        logger=csv trainer.progress_bar=none "$@")
rl=(algo.max_new_tokens=8 algo.minibatch_size=8 algo.micro_batch_size=8
    algo.eval_prompts=16 trainer.eval_every="$STEPS")

stage() {  # stage NAME OVERRIDES...
  local name=$1 start=$SECONDS
  shift
  if ! "$PYTHON" train.py "${common[@]}" "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1; then
    echo "$name: FAILED ($PRECISION, $IMPL); the end of $OUT/$name.log:" >&2
    tail -5 "$OUT/$name.log" >&2
    exit 1
  fi
  "$PYTHON" - "$name" "$((SECONDS - start))" "$OUT/$name/csv/metrics.csv" <<'PY'
import csv, sys
name, wall, path = sys.argv[1], sys.argv[2], sys.argv[3]
rows = list(csv.DictReader(open(path)))
loss = next((k for k in ("train/loss", "train/pg_loss", "train/policy_loss") if any(r.get(k) for r in rows)), None)
last = [r[loss] for r in rows if loss and r.get(loss)]
print(f"{name:9s} {wall:>4s} s  {loss or '-'} {float(last[-1]):.4f}" if last else f"{name:9s} {wall:>4s} s")
PY
}

mkdir -p "$OUT"
echo "every stage: model=$MODEL, $STEPS steps, trainer.precision=$PRECISION, algo.optim.impl=$IMPL -> $OUT"
stage pretrain algo=pretrain trainer.eval_every="$STEPS"
stage sft algo=sft init_from="$OUT/pretrain/checkpoints/last.ckpt" trainer.eval_every="$STEPS"
stage reward algo=reward init_from="$OUT/sft/checkpoints/last.ckpt" trainer.eval_every="$STEPS"
for algo in ppo reinforce rloo grpo; do
  k=$([ "$algo" = rloo ] || [ "$algo" = grpo ] && echo 4 || echo 1)
  stage "$algo" algo="$algo" init_from="$OUT/sft/checkpoints/last.ckpt" \
    algo.reward.model="$OUT/reward/checkpoints/last.ckpt" "${rl[@]}" algo.samples_per_prompt="$k" \
    algo.rollout_batch_size=$((8 / k))
done
