#!/usr/bin/env bash
# Every benchmark on one GPU with gpt2-small (124M) in bf16, in under 5 minutes:
#   bash bench/gpu_check.sh [OUT_DIR]        (default outputs/bench-gpu; one JSON per bench)
# The figures to compare with bench/README.md's CPU ones are the ratios: MFU (against the GPU's
# bf16 matmul peak measured in the same run), the KV-cache speed-up, the PPO phase shares.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/bench-gpu}
mkdir -p "$OUT"
export WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() {  # run NAME ARGS...: one bench, its JSON into $OUT/NAME.json, its time on stderr
  local name=$1 start=$SECONDS
  shift
  python "bench/$name.py" "$@" > "$OUT/$name.json"
  echo "bench/$name.py: $((SECONDS - start)) s -> $OUT/$name.json" >&2
}
run train_step --models gpt2-small --dtypes bf16,fp32 --compile both --batch 8 --seq 1024 --steps 10 --profile
run generate --model gpt2-small --dtype bf16 --batches 1,4,16,64 --recompute-batches 1,16 --static --compile
run ppo_step --model gpt2-small --iterations 6 -- trainer=gpu
run data --model gpt2-small --dtype bf16 --batch 8 --seq 1024
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
t = json.loads((out / "train_step.json").read_text())
for r in t["results"]:
    print(f"train_step {r['model']} {r['dtype']} compile={r['compile']}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.2f}")
g = json.loads((out / "generate.json").read_text())
for r in g["results"]:
    print(f"generate batch {r['batch']}: cache {r['cache_tokens_per_s']:.0f} tok/s, speed-up {r.get('cache_speedup', '-')}")
p = json.loads((out / "ppo_step.json").read_text())
print(f"ppo_step: {p['iteration_s']} s/iteration, shares {p['shares']}")
d = json.loads((out / "data.json").read_text())
print(f"data: loader headroom {d['loader_headroom']}x")
PY
