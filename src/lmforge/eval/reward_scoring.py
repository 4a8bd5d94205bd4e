"""A reward-model checkpoint, ready to score: rewards of (prompt, response) texts rendered as the
model was trained, accuracy on preference pairs (per task kind where the pairs carry one), and
the pairs of the synthetic world ordered by its noiseless judge. `python -m lmforge.score` is
its command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from lmforge.data.preference_data import encode_preferences, pad_batch
from lmforge.data.preference_records import PreferencePair, iter_json_objects, parse_hh_record, parse_jsonl_record
from lmforge.data.templates import BadRecords, encode_pair, render_prompt
from lmforge.errors import DataError, UsageError
from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import ScalarModel, gather_last
from lmforge.training.checkpoint import CheckpointError, load_matching, submodule_state


class RewardScorer:
    """A reward-model checkpoint, ready to score (prompt, response) texts."""

    def __init__(self, path: str | Path, device: str = "cpu", raw: bool = False):
        ckpt = load_any_checkpoint(path)
        if ckpt.stage != "reward":
            raise CheckpointError(
                f"{path} is a '{ckpt.stage}' checkpoint; scoring needs a reward model (a checkpoint of algo=reward)"
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
                    obj,
                    where,
                    bad,
                    chosen_field=args["chosen_field"],
                    rejected_field=args["rejected_field"],
                    assistant_marker=self.assistant_marker,
                )
            else:
                pair = parse_jsonl_record(
                    obj,
                    where,
                    bad,
                    prompt_field=args["prompt_field"],
                    chosen_field=args["chosen_field"],
                    rejected_field=args["rejected_field"],
                    prompt_template=self.prompt_template,
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
    """`synthetic:test[:N]`, `synthetic:hard[:N]` or `synthetic:seen[:N]`: pairs ordered by the
    world's noiseless judge (chosen = the better response), rendered as the checkpoint's run
    rendered them (raw= aside). `hard` is the world's split of longer numbers, never trained on."""
    from lmforge.data.preference_records import extra_world_pairs, synthetic_pairs, unseen_pairs

    _, _, rest = spec.partition(":")
    which, _, n = rest.partition(":")
    if which not in ("test", "hard", "seen") or (n and not n.isdigit()) or n == "0":
        raise UsageError(
            f"input={spec!r}: use synthetic:test, synthetic:hard or synthetic:seen, optionally with :N pairs"
        )
    data = scorer.data_config
    cfg = SimpleNamespace(
        seed=int(data.get("seed", 0)), prompt_template=data["prompt_template"], response_prefix=data["response_prefix"]
    )
    n_pairs = int(n or 800)
    if which in ("test", "hard"):
        return synthetic_pairs(cfg, n_pairs, which, 0.0)
    if scorer.source != "synthetic":
        raise UsageError(
            f"input={spec!r}: the checkpoint was trained on data.source={scorer.source!r}, so "
            "which synthetic pairs it saw is unknown; synthetic:test and synthetic:hard need no such knowledge"
        )
    trained = synthetic_pairs(cfg, int(data["n_pairs"]), "train", float(data.get("annotator_noise", 0.0)))
    if data.get("extra_pairs"):  # the run also trained on these (data.extra_pairs): none of them is "new"
        if not os.path.isfile(data["extra_pairs"]):
            raise UsageError(
                f"input={spec!r}: the checkpoint also trained on data.extra_pairs={data['extra_pairs']}, which is "
                "gone, so which pairs it saw is unknown; synthetic:test and synthetic:hard need no such knowledge"
            )
        trained += extra_world_pairs(SimpleNamespace(**vars(cfg), extra_pairs=data["extra_pairs"]), BadRecords("skip"))
    return unseen_pairs(cfg, n_pairs, trained)
