"""Score responses with a trained reward model.

    python -m lmforge.score ckpt=<reward.ckpt> input=pairs.jsonl
        held-out {prompt, chosen, rejected} pairs -> {"n", "accuracy", "margin_mean", ...}
    python -m lmforge.score ckpt=<reward.ckpt> prompt="What is 2 + 3?" response="5"
        one response -> {"reward", "reward_normalized"}
    python -m lmforge.score ckpt=<reward.ckpt> input=responses.jsonl [output=scores.jsonl]
        {prompt, response} records -> each record plus "reward" and "reward_normalized"
    python -m lmforge.score ckpt=<reward.ckpt> input=synthetic:test[:N]   (or synthetic:seen[:N])
        agreement with the synthetic world's noiseless judge, overall and per task kind, on N
        (default 800) pairs of the held-out test prompts, or on new pairs of the training prompts
        that the checkpoint's run did not train on (its data.seed, n_pairs, annotator_noise)

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
from types import SimpleNamespace

import torch

from lmforge.checkpoint import CheckpointError, load_checkpoint, load_matching, submodule_state
from lmforge.data.errors import DataError
from lmforge.data.preference_data import (
    PreferencePair,
    encode_preferences,
    iter_json_objects,
    pad_batch,
    parse_hh_record,
    parse_jsonl_record,
)
from lmforge.data.templates import BadRecords, encode_pair, render_prompt
from lmforge.model import ScalarModel, gather_last

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


class UsageError(ValueError):
    pass


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


class RewardScorer:
    """A reward-model checkpoint, ready to score (prompt, response) texts."""

    def __init__(self, path: str | Path, device: str = "cpu", raw: bool = False):
        ckpt = load_checkpoint(path)
        if ckpt.stage != "reward":
            raise CheckpointError(
                f"{path} is a '{ckpt.stage}' checkpoint; scoring needs a reward model "
                "(a checkpoint of algo=reward)"
            )
        self.model = ScalarModel(ckpt.model_config)
        load_matching(self.model, submodule_state(ckpt.state_dict, "model"), str(path))
        self.model.eval().to(device)
        self.device = device
        self.tokenizer = ckpt.tokenizer
        self.stats = ckpt.meta.get("reward_stats")
        config = ckpt.meta.get("config") or {}
        data, algo = config.get("data", {}), config.get("algo", {})
        self.source = data.get("source", "jsonl")
        self.raw = raw
        self.prompt_template = "{prompt}" if raw else data.get("prompt_template", "{prompt}")
        self.response_prefix = "" if raw else data.get("response_prefix", "")
        self.assistant_marker = data.get("assistant_marker", "\n\nAssistant:")
        self.seq_len = int(algo.get("seq_len") or ckpt.model_config.max_seq_len)
        self.data_config = data

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        if self.raw or self.source == "hh":  # HH prompts are whole dialogues, used verbatim
            return prompt, response
        return render_prompt(self.prompt_template, prompt), self.response_prefix + response

    def normalize(self, reward: float) -> float | None:
        if not self.stats:
            return None
        return (reward - self.stats["mean"]) / max(self.stats["std"], 1e-8)

    @torch.no_grad()
    def rewards(self, ids: list[list[int]], batch_size: int = 32) -> list[float]:
        out: list[float] = []
        for i in range(0, len(ids), batch_size):
            x, mask = pad_batch(ids[i : i + batch_size], self.tokenizer.pad_id)
            values = self.model(x.to(self.device), attention_mask=mask.to(self.device))
            out += gather_last(values, mask.to(self.device)).float().cpu().tolist()
        return out

    def score(self, prompt: str, response: str) -> float:
        """The reward of one (unrendered) prompt and response."""
        p, r = self.render(prompt, response)
        return self.rewards([encode_pair(self.tokenizer, p, r, self.seq_len).ids])[0]

    def read_pairs(self, path: str, args: dict, bad: BadRecords) -> list[PreferencePair]:
        pairs = []
        for where, obj in iter_json_objects(path, bad, "input"):
            if self.source == "hh" and not self.raw:
                pair = parse_hh_record(
                    obj, where, bad, chosen_field=args["chosen_field"],
                    rejected_field=args["rejected_field"], assistant_marker=self.assistant_marker,
                )
            else:
                pair = parse_jsonl_record(
                    obj, where, bad, prompt_field=args["prompt_field"], chosen_field=args["chosen_field"],
                    rejected_field=args["rejected_field"], prompt_template=self.prompt_template,
                    response_prefix=self.response_prefix,
                )
            if pair is not None:
                pairs.append(pair)
        return pairs

    def pair_accuracy(self, pairs: list[PreferencePair], bad: BadRecords, batch_size: int = 32) -> dict:
        encoded, kept, truncated = encode_preferences(self.tokenizer, pairs, self.seq_len, bad, "input pairs")
        if not encoded:
            raise DataError("no pair to score: every record was bad (see the warnings above)")
        r_c = self.rewards([p.chosen for p in encoded], batch_size)
        r_r = self.rewards([p.rejected for p in encoded], batch_size)
        diff = torch.tensor(r_c) - torch.tensor(r_r)
        by_kind: dict[str, list[bool]] = {}
        for i, d in zip(kept, diff.tolist()):
            if pairs[i].kind:
                by_kind.setdefault(pairs[i].kind, []).append(d > 0)
        result = {
            "n": len(encoded),
            "accuracy": float((diff > 0).float().mean()),
            "margin_mean": float(diff.mean()),
            "chosen_reward_mean": float(torch.tensor(r_c).mean()),
            "rejected_reward_mean": float(torch.tensor(r_r).mean()),
            "truncated": truncated,
            "skipped": sum(bad.counts.values()),
        }
        if by_kind:  # synthetic pairs: accuracy per task kind
            result["by_kind"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
        return result


def synthetic_judge_pairs(scorer: RewardScorer, spec: str) -> list[PreferencePair]:
    """`synthetic:test[:N]` or `synthetic:seen[:N]`: pairs ordered by the world's noiseless judge
    (chosen = the better response), rendered as the checkpoint's run rendered them (raw= aside)."""
    from lmforge.data.preference_data import synthetic_pairs, unseen_pairs

    _, _, rest = spec.partition(":")
    which, _, n = rest.partition(":")
    if which not in ("test", "seen") or (n and not n.isdigit()) or n == "0":
        raise UsageError(f"input={spec!r}: use synthetic:test or synthetic:seen, optionally with :N pairs")
    data = scorer.data_config
    cfg = SimpleNamespace(seed=int(data.get("seed", 0)), prompt_template=data["prompt_template"],
                          response_prefix=data["response_prefix"])
    n_pairs = int(n or 800)
    if which == "test":
        return synthetic_pairs(cfg, n_pairs, "test", 0.0)
    if scorer.source != "synthetic":
        raise UsageError(f"input={spec!r}: the checkpoint was trained on data.source={scorer.source!r}, so "
                         "which synthetic pairs it saw is unknown; synthetic:test needs no such knowledge")
    trained = synthetic_pairs(cfg, int(data["n_pairs"]), "train", float(data.get("annotator_noise", 0.0)))
    return unseen_pairs(cfg, n_pairs, trained)


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
