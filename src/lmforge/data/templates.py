"""Prompt/response rendering and tokenization shared by SFT, reward modeling and RL prompts.

The template is config (data.prompt_template, data.response_prefix), never code: a prompt is
rendered as `prompt_template.format(prompt=...)`, the response follows as
`response_prefix + response`, then EOS. When prompt + response exceed the context, tokens are
cut from the LEFT of the prompt: the response end (and its EOS) is what the model must learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)


def render_prompt(template: str, prompt: str) -> str:
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"data.prompt_template={template!r} cannot be rendered ({e}); it may only use the "
            "field {prompt} (write literal braces as {{ and }})"
        ) from None


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int  # the first n_prompt ids are prompt tokens (no loss on them)
    truncated: bool  # prompt tokens were dropped from the left to fit


def encode_pair(tok: Tokenizer, prompt_text: str, response_text: str, max_len: int, add_eos: bool = True) -> Encoded:
    """Tokens of a rendered prompt followed by its response (+EOS), at most max_len of them."""
    p = tok.encode(prompt_text)
    r = tok.encode(response_text) + ([tok.eos_id] if add_eos else [])
    if len(r) >= max_len:
        # Not even one prompt token would fit: keep the response start; this is rare and counted.
        raise DataError(f"a response of {len(r)} tokens does not fit max length {max_len}")
    keep = max_len - len(r)
    truncated = len(p) > keep
    p = p[len(p) - keep :] if truncated else p
    return Encoded(p + r, len(p), truncated)


@dataclass
class BadRecords:
    """Counts problems in the data. policy "error": raise at the first; "skip": count and go on.

    Nothing is silent: skips are logged at the end with per-reason counts and a first example.
    """

    policy: str = "error"
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def report(self, reason: str, where: str, detail: str = "") -> None:
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.policy == "error":
            raise DataError(msg + "; fix the record, or set data.on_bad_record=skip to skip such records")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, msg)

    def log_summary(self, what: str) -> None:
        for reason, n in self.counts.items():
            log.warning("%s: skipped %d record(s): %s, e.g. %s", what, n, reason, self.examples[reason])
