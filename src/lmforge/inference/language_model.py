"""A trained checkpoint's language model, ready to sample: batched samples cut at stop strings,
or one response streamed as its tokens arrive. Used by `python -m lmforge.generate` and the
feedback app; any checkpoint `init_from=` accepts (a stage checkpoint, a `convert import`
folder, a Hugging Face model folder) loads, except a reward model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from lmforge.errors import UsageError

DEFAULT_TEMPLATE = "User: {prompt}\nAssistant:"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The content hash of a checkpoint file, or of a model folder (a Hugging Face model or a
    `convert import` output): its files' relative names and contents, in name order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


@dataclass
class Sample:
    text: str  # the response, cut at a stop string
    finish_reason: str  # "eos" | "stop" | "length"
    n_tokens: int  # generated tokens (EOS included, nothing after a stop string)


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop: tuple[str, ...] = ("\nUser:",)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise UsageError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k={self.top_k} must be >= 1 (or null to disable)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p={self.top_p} must be in (0, 1] (or null to disable)")

    def as_dict(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "stop": list(self.stop),
        }


class _Stop(Exception):
    """Raised from the streaming callback to end generation at a stop string."""


class TextStream:
    """Turns a growing token sequence into printable text increments.

    The whole sequence is decoded at every token and only the new suffix is emitted, so a
    character spelled by several byte tokens is printed once it is complete (a trailing
    U+FFFD of an unfinished character is held back). Text that could be the start of a stop
    string is held back too, until it is known not to be one."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), write: Callable[[str], None] | None = None):
        self.tokenizer, self.stop, self.write = tokenizer, tuple(s for s in stop if s), write
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            if self.write is not None:
                self.write(text[len(self.emitted) :])
            self.emitted = text

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has been produced."""
        if self.stopped:
            return True
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit(text[:cut])
            self.emitted = text[:cut]
            self.stopped = True
            return True
        stable = text.rstrip("\ufffd")
        self._emit(stable[: len(stable) - self._held_back(stable)])
        return False

    def finish(self) -> str:
        """Emit whatever was held back (a generation that ended); the full response text."""
        if not self.stopped:
            self._emit(self.tokenizer.decode(self.ids))
            self.emitted = self.tokenizer.decode(self.ids)
        return self.emitted


class LanguageModel:
    """A checkpoint's CausalLM and tokenizer, ready to sample."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch  # noqa: F401  (heavy; the CLI imports it only when it samples)

        from lmforge.hf.importer import load_any_checkpoint
        from lmforge.model import CausalLM
        from lmforge.training.checkpoint import (
            POLICY_STAGES,
            CheckpointError,
            load_matching,
            require_stage,
            submodule_state,
        )

        self.path = Path(path)
        ckpt = load_any_checkpoint(self.path)
        if ckpt.stage == "reward":
            require_stage(ckpt, POLICY_STAGES, "ckpt")
        weights = submodule_state(ckpt.state_dict, "model")
        if not weights:
            raise CheckpointError(f"ckpt={self.path} ('{ckpt.stage}' checkpoint) has no model.* weights to sample from")
        model = CausalLM(replace(ckpt.model_config, dropout=0.0))
        try:
            load_matching(model, weights, f"ckpt={self.path}")
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nckpt={self.path} ('{ckpt.stage}') holds no language model to sample from"
            ) from None
        self.model = model.to(device).eval()
        self.device = device
        self.tokenizer = ckpt.tokenizer
        self.stage = ckpt.stage
        self.max_seq_len = ckpt.model_config.max_seq_len
        data = (ckpt.meta.get("config") or {}).get("data") or {}
        self.default_template = data.get("prompt_template") or DEFAULT_TEMPLATE
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def describe(self) -> dict:
        return {"ckpt": str(self.path), "ckpt_sha256": self.sha256, "stage": self.stage}

    def _fit(self, text: str, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids cut from the left to leave room for the response; the token budget."""
        budget = min(max_new_tokens, self.max_seq_len - 1)
        ids = self.tokenizer.encode(text)[-(self.max_seq_len - budget) :] or [self.tokenizer.eos_id]
        return ids, budget

    def sample(self, texts: list[str], s: SamplingSettings, generator=None, batch_size: int = 16) -> list[Sample]:
        """One response per rendered prompt text, batched, cut at stop strings."""
        from lmforge.model import generate

        s.check()
        out: list[Sample] = []
        tok = self.tokenizer
        for start in range(0, len(texts), batch_size):
            fitted = [self._fit(t, s.max_new_tokens) for t in texts[start : start + batch_size]]
            budget = min(b for _, b in fitted)
            res = generate(
                self.model,
                [ids for ids, _ in fitted],
                max_new_tokens=budget,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                generator=generator,
            )
            for row, mask, eos in zip(res.sequences[:, res.prompt_len :], res.response_mask, res.ended_with_eos):
                ids = row[mask].tolist()
                stream = TextStream(tok, s.stop)
                stopped = any(stream.push(t) for t in ids)
                text = stream.finish()
                reason = "stop" if stopped else ("eos" if bool(eos) else "length")
                out.append(Sample(text, reason, len(stream.ids)))
        return out

    def stream(self, text: str, s: SamplingSettings, write: Callable[[str], None], generator=None) -> Sample:
        """One response, written piece by piece as tokens arrive."""
        from lmforge.model import generate

        s.check()
        tok = self.tokenizer
        ids, budget = self._fit(text, s.max_new_tokens)
        stream = TextStream(tok, s.stop, write)
        ended = []

        def on_tokens(tokens) -> None:
            t = int(tokens[0])
            if t == tok.eos_id:
                ended.append(True)
                return
            if stream.push(t):
                raise _Stop

        try:
            generate(
                self.model,
                [ids],
                max_new_tokens=budget,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                generator=generator,
                on_tokens=on_tokens,
            )
        except _Stop:
            pass
        response = stream.finish()
        reason = "stop" if stream.stopped else ("eos" if ended else "length")
        return Sample(response, reason, len(stream.ids) + len(ended))


def make_generator(seed: int, device: str = "cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))
