#!/usr/bin/env bash
# The whole RLHF pipeline on the default data (the synthetic world):
#   pretrain -> SFT -> reward model -> PPO
# each stage starting from the previous stage's checkpoint, printing where every checkpoint is.
#
#   scripts/pipeline.sh [OUT_DIR] [overrides for every stage ...]
#   MODEL=nano PRETRAIN_STEPS=40 SFT_STEPS=40 REWARD_STEPS=20 PPO_STEPS=4 scripts/pipeline.sh /tmp/p
#   PRETRAINED=outputs/pipeline/x/pretrain/checkpoints/last.ckpt scripts/pipeline.sh /tmp/q seed=1338
#     (start from that pretrained checkpoint: no pretraining stage; the other stages as above)
#   LABEL_PROMPTS=3000 scripts/pipeline.sh /tmp/r
#     (the reward model also learns from the annotator's verdicts on the SFT policy's own samples:
#      python -m lmforge.label on LABEL_PROMPTS training prompts x 4 samples, data.n_pairs=5000 world pairs)
#
# Defaults are sized for the tiny model on a CPU (tens of minutes). PPO's reward is the reward
# model (normalized by its stored statistics) and its critic starts from it; the synthetic
# world's ground-truth judge is logged alongside (rollout/gt_score, val/gt_score), so the run
# shows whether optimizing the learned reward improved the real one.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-outputs/pipeline/$(date +%Y%m%d-%H%M%S)}
[ $# -gt 0 ] && shift
MODEL=${MODEL:-tiny}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
SFT_STEPS=${SFT_STEPS:-300}
REWARD_STEPS=${REWARD_STEPS:-150}
PPO_STEPS=${PPO_STEPS:-60}
LABEL_PROMPTS=${LABEL_PROMPTS:-0}
PYTHON=${PYTHON:-python}

common=(model="$MODEL" logger=csv trainer.progress_bar=plain "$@")
declare -A CKPT

stage() {  # stage NAME OVERRIDES...: run one stage into $OUT/NAME, remember its checkpoint
  local name=$1
  shift
  echo "=== $name -> $OUT/$name" >&2
  "$PYTHON" train.py "${common[@]}" "$@" hydra.run.dir="$OUT/$name"
  CKPT[$name]="$OUT/$name/checkpoints/last.ckpt"
  [ -f "${CKPT[$name]}" ] || { echo "error: $name wrote no ${CKPT[$name]}" >&2; exit 1; }
  echo "=== $name checkpoint: ${CKPT[$name]}" >&2
}

if [ -n "${PRETRAINED:-}" ]; then
  [ -f "$PRETRAINED" ] || { echo "error: PRETRAINED=$PRETRAINED is not a file (a pretraining checkpoint, e.g. <run>/checkpoints/last.ckpt)" >&2; exit 2; }
  CKPT[pretrain]=$PRETRAINED
  echo "=== pretrain: from $PRETRAINED (PRETRAINED), not run" >&2
else
  stage pretrain algo=pretrain trainer.max_steps="$PRETRAIN_STEPS" \
    trainer.eval_every="$(( (PRETRAIN_STEPS + 1) / 2 ))"
fi
stage sft algo=sft init_from="${CKPT[pretrain]}" trainer.max_steps="$SFT_STEPS" \
  trainer.eval_every="$(( (SFT_STEPS + 1) / 2 ))"
reward_data=()
if [ "$LABEL_PROMPTS" -gt 0 ]; then
  echo "=== label -> $OUT/labels.jsonl" >&2
  "$PYTHON" -m lmforge.label policy="${CKPT[sft]}" out="$OUT/labels.jsonl" prompts="$LABEL_PROMPTS" samples=4 \
    > "$OUT/labels.summary.json"
  reward_data=(data.extra_pairs="$OUT/labels.jsonl" data.n_pairs=5000)
fi
stage reward algo=reward init_from="${CKPT[sft]}" trainer.max_steps="$REWARD_STEPS" \
  trainer.eval_every="$(( (REWARD_STEPS + 1) / 2 ))" "${reward_data[@]}"
stage ppo algo=ppo init_from="${CKPT[sft]}" algo.reward.model="${CKPT[reward]}" algo.critic=reward_model \
  trainer.max_steps="$PPO_STEPS" trainer.eval_every="$(( PPO_STEPS < 10 ? PPO_STEPS : 10 ))" trainer.log_every=1 \
  algo.rollout_batch_size=32 algo.max_new_tokens=8 algo.ppo_epochs=2 algo.minibatch_size=16 \
  algo.micro_batch_size=16 algo.optim.lr=5e-5

echo
echo "Checkpoints:"
for name in pretrain sft reward ppo; do
  printf '  %-9s %s\n' "$name" "${CKPT[$name]}"
done
"$PYTHON" - "$OUT/ppo/csv/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("val/gt_score")]
if rows:
    first, last = rows[0], rows[-1]
    print(f"Held-out ground-truth judge score: {float(first['val/gt_score']):.3f} (SFT policy, step {first['step']}) "
          f"-> {float(last['val/gt_score']):.3f} (PPO, step {last['step']}); KL to the SFT policy "
          f"{float(last['val/kl']):.2f} nats/response")
PY
