#!/usr/bin/env bash
# Does learning from preferences make the model better on held-out prompts? From a finished
# scripts/pipeline.sh folder (pretrain, sft, reward, ppo), on the same SFT start and the same
# held-out prompts:
#   - ENSEMBLE-1 more reward models, trained like the pipeline's but with other seeds;
#   - RL against the single learned reward model (PPO = the pipeline's own run; REINFORCE, RLOO, GRPO);
#   - PPO against the ensemble with the conservative reward (uwo: mean - LAMBDA * std);
#   - PPO against the world's ground-truth judge (what RL reaches without reward-model error).
# Prints one JSON line per run: the held-out judge score at the start (SFT), at the end and at
# its best, the KL to SFT at the end, and the wall time; python -m lmforge.report draws the gold
# and proxy curves against sqrt(KL).
#
#   scripts/rlhf_efficacy.sh PIPELINE_DIR [overrides for every run ...]
#   ENSEMBLE=3 LAMBDA=1.0 RUNS="ppo-judge ppo-ensemble reinforce-rm" scripts/rlhf_efficacy.sh outputs/pipeline/x
#   SEED=1338 scripts/rlhf_efficacy.sh outputs/pipeline/s1338   # the pipeline ran with seed=1338
set -euo pipefail
cd "$(dirname "$0")/.."

P=${1:?usage: scripts/rlhf_efficacy.sh PIPELINE_DIR [overrides ...]}
shift
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-tiny}
SEED=${SEED:-1337}  # the pipeline's seed= (train.py's default: 1337); extra reward models: 1000*SEED + k
ENSEMBLE=${ENSEMBLE:-3}
LAMBDA=${LAMBDA:-1.0}
REWARD_STEPS=${REWARD_STEPS:-150}
PPO_STEPS=${PPO_STEPS:-60}
RUNS=${RUNS:-"ppo-judge ppo-ensemble reinforce-rm rloo-rm grpo-rm"}
SFT="$P/sft/checkpoints/last.ckpt"
RM="$P/reward/checkpoints/last.ckpt"
[ -f "$SFT" ] && [ -f "$RM" ] || { echo "error: $P has no sft/ and reward/ checkpoints (run scripts/pipeline.sh)" >&2; exit 2; }

common=(model="$MODEL" logger=csv trainer.progress_bar=plain "$@")
# The pipeline's PPO settings, shared by every RL run here so that only the reward differs.
rl=(seed="$SEED" init_from="$SFT" trainer.max_steps="$PPO_STEPS" trainer.eval_every="$(( PPO_STEPS < 10 ? PPO_STEPS : 10 ))"
    trainer.log_every=1 algo.rollout_batch_size=32 algo.max_new_tokens=8 algo.micro_batch_size=16
    algo.missing_eos_penalty=1.0 algo.optim.lr=5e-5)
ppo=(algo=ppo algo.ppo_epochs=2 algo.minibatch_size=16)
pg=(algo.minibatch_size=32)  # the plain policy gradient: one update over all 32 responses
group=(algo.samples_per_prompt=4 algo.rollout_batch_size=8)  # RLOO/GRPO: 8 prompts x 4 = 32 responses

run() {  # run NAME OVERRIDES...: one train.py run into $P/efficacy/NAME, timed
  local name=$1
  shift
  local dir="$P/efficacy/$name"
  if [ -f "$dir/checkpoints/last.ckpt" ]; then echo "=== $name: done already ($dir)" >&2; return; fi
  echo "=== $name -> $dir" >&2
  local t0=$SECONDS
  "$PYTHON" train.py "${common[@]}" "$@" hydra.run.dir="$dir"
  echo $(( SECONDS - t0 )) > "$dir/wall_s"
}

members=("$RM")
for k in $(seq 1 $(( ENSEMBLE - 1 ))); do
  if [[ " $RUNS " == *" ppo-ensemble "* ]]; then
    run "reward-seed$k" algo=reward init_from="$SFT" seed="$(( 1000 * SEED + k ))" trainer.max_steps="$REWARD_STEPS" \
      trainer.eval_every="$(( (REWARD_STEPS + 1) / 2 ))"
    members+=("$P/efficacy/reward-seed$k/checkpoints/last.ckpt")
  fi
done
sources=$(printf '{ckpt:%s},' "${members[@]}")

for name in $RUNS; do
  case $name in
    ppo-judge) run "$name" "${ppo[@]}" "${rl[@]}" algo.critic=policy_head \
                 'algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]' ;;
    ppo-ensemble) run "$name" "${ppo[@]}" "${rl[@]}" algo.critic=reward_model algo.critic_from="$RM" "algo.reward.sources=[${sources%,}]" \
                 algo.reward.ensemble=uwo algo.reward.ensemble_lambda="$LAMBDA" ;;
    ppo-rm) run "$name" "${ppo[@]}" "${rl[@]}" algo.critic=reward_model algo.reward.model="$RM" ;;
    reinforce-rm) run "$name" algo=reinforce "${rl[@]}" "${pg[@]}" algo.reward.model="$RM" ;;
    rloo-rm|grpo-rm) run "$name" algo="${name%-rm}" "${rl[@]}" "${pg[@]}" "${group[@]}" algo.reward.model="$RM" ;;
    *) echo "error: unknown run $name (ppo-judge ppo-ensemble ppo-rm reinforce-rm rloo-rm grpo-rm)" >&2; exit 2 ;;
  esac
done

"$PYTHON" - "$P" $RUNS <<'PY'
import json, sys
from pathlib import Path
from lmforge.report import load_run, overoptimization_curve
root = Path(sys.argv[1])
dirs = {"ppo": root / "ppo"} | {n: root / "efficacy" / n for n in sys.argv[2:]}
for name, d in dirs.items():
    if not (d / "csv").is_dir():
        continue
    run = load_run(d)
    curve = overoptimization_curve(run)
    if not curve:
        continue
    wall = (d / "wall_s").read_text().strip() if (d / "wall_s").is_file() else None
    print(json.dumps({
        "run": name, "gold_start": round(curve[0][1], 4), "gold_end": round(curve[-1][1], 4),
        "gold_max": round(max(g for _, g, _ in curve), 4), "kl_end": round(curve[-1][0] ** 2, 3),
        "proxy_start": curve[0][2], "proxy_end": curve[-1][2], "wall_s": wall,
        "gold_curve": [round(g, 3) for _, g, _ in curve],
    }))
PY
