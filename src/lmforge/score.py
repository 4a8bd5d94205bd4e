"""Score responses with a trained reward model.

    python -m lmforge.score ckpt=<reward.ckpt> input=pairs.jsonl
        held-out {prompt, chosen, rejected} pairs -> {"n", "accuracy", "margin_mean", ...}
    python -m lmforge.score ckpt=<reward.ckpt> prompt="What is 2 + 3?" response="5"
        one response -> {"reward", "reward_normalized"}
    python -m lmforge.score ckpt=<reward.ckpt> input=responses.jsonl [output=scores.jsonl]
        {prompt, response} records -> each record plus "reward" and "reward_normalized"
    python -m lmforge.score ckpt=<reward.ckpt> input=synthetic:test[:N]   (or :hard, :seen)
        agreement with the synthetic world's noiseless judge, overall and per task kind, on N
        (default 800) pairs of the held-out test prompts; synthetic:hard: of the harder split's
        prompts (longer numbers, numeric kinds); synthetic:seen: new pairs of the training
        prompts that the checkpoint's run did not train on (its data.seed, n_pairs, annotator_noise)

Prompts and responses are rendered as the reward model was trained (the checkpoint's
data.prompt_template and data.response_prefix; HH-style prompts verbatim); raw=true uses them
verbatim. "reward_normalized" is (reward - mean) / std with the statistics stored at training.

Options: prompt_field= chosen_field= rejected_field= response_field= (record fields),
output=, raw=true|false, on_bad_record=error|skip, batch_size=32, device=cpu.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.data.preference_records import iter_json_objects
from lmforge.data.templates import BadRecords, encode_pair
from lmforge.errors import DataError, UsageError
from lmforge.eval.reward_scoring import RewardScorer, synthetic_judge_pairs
from lmforge.training.checkpoint import CheckpointError

OPTIONS = {
    "ckpt": None,
    "input": None,
    "output": None,
    "prompt": None,
    "response": None,
    "prompt_field": "prompt",
    "chosen_field": "chosen",
    "rejected_field": "rejected",
    "response_field": "response",
    "raw": "false",
    "on_bad_record": "error",
    "batch_size": "32",
    "device": "cpu",
}


def parse_args(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments over OPTIONS' defaults; unknown keys are refused."""
    args = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key not in OPTIONS:
            raise UsageError(f"unknown option {key!r}; options: {', '.join(OPTIONS)}")
        args[key] = value
    if not args["ckpt"]:
        raise UsageError("ckpt=<reward checkpoint> is required")
    if args["on_bad_record"] not in ("error", "skip"):
        raise UsageError(f"on_bad_record={args['on_bad_record']!r}: use error or skip")
    return args


def _is_pairs_file(path: str, args: dict) -> bool:
    for _, obj in iter_json_objects(path, BadRecords("skip"), "input"):
        if args["chosen_field"] in obj:
            return True
        if args["response_field"] in obj:
            return False
        raise DataError(
            f"{path}: records have neither {args['chosen_field']!r} (pairs) nor "
            f"{args['response_field']!r} (responses); set chosen_field= or response_field="
        )
    raise DataError(f"{path}: no records")


def score_responses(scorer: RewardScorer, args: dict, bad: BadRecords, batch_size: int) -> dict:
    path = args["input"]
    out_path = args["output"] or str(Path(path).with_suffix("")) + ".scores.jsonl"
    records, ids = [], []
    for where, obj in iter_json_objects(path, bad, "input"):
        fields = []
        for name, key in ((args["prompt_field"], "prompt_field"), (args["response_field"], "response_field")):
            value = obj.get(name)
            if not isinstance(value, str):
                bad.report(f"field {name!r} is missing or not a string", where, key)
                break
            fields.append(value)
        else:
            try:
                ids.append(encode_pair(scorer.tokenizer, *scorer.render(*fields), scorer.seq_len).ids)
            except DataError as e:
                bad.report("response does not fit the context", where, str(e))
                continue
            records.append(obj)
    rewards = scorer.rewards(ids, batch_size)
    with open(out_path, "w", encoding="utf-8") as f:
        for obj, r in zip(records, rewards):
            f.write(json.dumps({**obj, "reward": r, "reward_normalized": scorer.normalize(r)}) + "\n")
    return {
        "n": len(records),
        "skipped": sum(bad.counts.values()),
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "output": out_path,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the command; returns (and prints) the result as a JSON-able dict."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scorer = RewardScorer(args["ckpt"], args["device"], raw=args["raw"].lower() in ("1", "true", "yes"))
    batch_size = int(args["batch_size"])
    bad = BadRecords(args["on_bad_record"])
    if args["input"] and args["input"].startswith("synthetic:"):
        result = scorer.pair_accuracy(synthetic_judge_pairs(scorer, args["input"]), bad, batch_size)
    elif args["input"]:
        if _is_pairs_file(args["input"], args):
            result = scorer.pair_accuracy(scorer.read_pairs(args["input"], args, bad), bad, batch_size)
        else:
            result = score_responses(scorer, args, bad, batch_size)
        bad.log_summary(args["input"])
    elif args["prompt"] is not None and args["response"] is not None:
        reward = scorer.score(args["prompt"], args["response"])
        result = {"reward": reward, "reward_normalized": scorer.normalize(reward)}
    else:
        raise UsageError("give input=<file.jsonl>, or prompt=... and response=...")
    print(json.dumps(result))
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command: errors become a message on stderr and an exit status (2: usage, 1: input)."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}\n\n{__doc__}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
