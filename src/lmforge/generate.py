"""Sample from any language-model checkpoint of lmforge (pretrain, SFT, PPO, ...).

    python -m lmforge.generate ckpt=<ckpt> prompt="What is 2 + 3?"          # streams the answer
    python -m lmforge.generate ckpt=<ckpt> prompts=prompts.txt out=out.jsonl  # batch, to JSONL
    python -m lmforge.generate ckpt=<ckpt> chat=true                           # terminal chat

Configured with Hydra like train.py (conf/generate.yaml, typed by GenerateConfig): every
option is `key=value` on the command line, e.g. `temperature=0.7 top_p=0.9 max_new_tokens=64
seed=3`; `--cfg` prints the composed config, `--help` this text.

* The prompt is rendered with `template` (default: the checkpoint's own
  data.prompt_template, else "User: {prompt}\\nAssistant:"); `raw=true` feeds it verbatim.
  `prompt=` and `template=` are taken verbatim from the command line (commas, colons and
  quotes need no Hydra quoting); in `template`, \\n and \\t stand for newline and tab.
* Output streams as tokens arrive: the growing token sequence is decoded and only the new,
  complete text is printed, so characters spelled by several byte tokens come out whole.
* Generation stops at EOS, after max_new_tokens, or at the first of the `stop` strings
  (default "\\nUser:", the start of the next turn; `stop=[]` disables it).
* prompts=<file>: `.txt` has one prompt per line (blank lines skipped); `.jsonl` one object
  per line with `prompt_field` (other fields are copied to the output) or a JSON string;
  `synthetic:N` draws N test prompts of the built-in synthetic world. Each output line is the
  record plus "response", "finish_reason" (eos | stop | length) and the sampling settings;
  without `out=` the lines go to stdout. `n=` samples per prompt.
* chat=true: a REPL. Each turn appends template(prompt) + response + "\\n" to the dialog, and
  the whole dialog (cut from the left to fit the context) is the next turn's prompt.
  /reset starts over, /quit (or Ctrl-D) leaves.

A reward-model checkpoint has a scalar head, not a language-model head: it is refused with a
message (score text with it using `python -m lmforge.score`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

from omegaconf import MISSING

DEFAULT_TEMPLATE = "User: {prompt}\nAssistant:"
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


class UsageError(ValueError):
    """A command line that cannot run, with what to change."""


# ================================================================== Hydra command lines


def register_schema(name: str, node: Any) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def decode_escapes(text: str) -> str:
    """\\n, \\t and \\\\ as typed on a shell command line -> newline, tab, backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def compose_cli(
    config_name: str,
    argv: list[str],
    *,
    schema: str,
    free_text: tuple[str, ...] = (),
    prefix: str = "",
):
    """The typed config of `config_name` (conf/<config_name>.yaml over its schema) with the
    `key=value` overrides of argv, as `@hydra.main` would compose it, minus the run folder.

    Keys in free_text are taken verbatim (they hold prose: prompts, templates, tokens) and set
    after composition; `prefix` is put before every key (a subcommand's section)."""
    from hydra import compose, initialize, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    overrides, verbatim = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if not sep or not bare:
            raise UsageError(f"expected key=value, got {arg!r} (see --help)")
        if bare in free_text:
            verbatim[bare] = _unquote(value)
        else:
            overrides.append(f"{key[: len(key) - len(bare)]}{prefix}{bare}={value}")
    GlobalHydra.instance().clear()
    try:
        if (REPO_CONF / f"{config_name}.yaml").is_file():
            with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
                cfg = compose(config_name, overrides=overrides)
        else:  # installed without the repository's conf/: the schema's defaults
            with initialize(config_path=None, version_base="1.3"):
                cfg = compose(schema, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    node = OmegaConf.select(cfg, prefix.rstrip(".")) if prefix else cfg
    with open_dict(node):
        for key, value in verbatim.items():
            if key not in node:
                raise UsageError(f"unknown option {key!r}")
            node[key] = value.replace("${", "\\${")  # literal text, never an interpolation
    return cfg


def run_cli(main: Callable[[list[str]], Any], argv: list[str], doc: str) -> int:
    """Shared CLI wrapper: --help, and user errors as one message (exit 2), not a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmforge.checkpoint import CheckpointError
    from lmforge.data.errors import DataError

    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        return 0
    try:
        main(argv)
    except (UsageError, CheckpointError, DataError, HydraException, OmegaConfBaseException, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


# ======================================================================= the config


@dataclass
class GenerateConfig:
    ckpt: str = MISSING  # a pretrain/SFT/PPO/... checkpoint (not a reward model)
    prompt: Optional[str] = None  # one prompt: its response streams to stdout
    prompts: Optional[str] = None  # a .txt / .jsonl file, or synthetic:N (batch mode)
    out: Optional[str] = None  # batch mode: write JSONL here (default: stdout)
    chat: bool = False  # interactive multi-turn chat in the terminal
    template: Optional[str] = None  # default: the checkpoint's data.prompt_template
    raw: bool = False  # feed prompts verbatim (no template)
    prompt_field: str = "prompt"  # .jsonl prompts: the field holding the prompt
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    n: int = 1  # samples per prompt (batch mode)
    batch_size: int = 16  # prompts per forward pass (batch mode)
    stop: List[str] = field(default_factory=lambda: ["\nUser:"])
    stream: bool = True  # single prompt: print tokens as they arrive
    device: str = "cpu"


register_schema("generate_schema", GenerateConfig)


# ==================================================================== the language model


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
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "stop": list(self.stop)}


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

        from lmforge.checkpoint import CheckpointError, load_checkpoint, load_matching, require_stage, submodule_state
        from lmforge.model import CausalLM

        self.path = Path(path)
        ckpt = load_checkpoint(self.path)
        if ckpt.stage == "reward":
            require_stage(ckpt, ("pretrain", "sft", "ppo", "reinforce", "rloo", "grpo"), "ckpt")
        weights = submodule_state(ckpt.state_dict, "model")
        if not weights:
            raise CheckpointError(f"ckpt={self.path} ('{ckpt.stage}' checkpoint) has no model.* weights to sample from")
        model = CausalLM(replace(ckpt.model_config, dropout=0.0))
        try:
            load_matching(model, weights, f"ckpt={self.path}")
        except CheckpointError as e:
            raise CheckpointError(f"{e}\nckpt={self.path} ('{ckpt.stage}') holds no language model to sample from") from None
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
            res = generate(self.model, [ids for ids, _ in fitted], max_new_tokens=budget, eos_id=tok.eos_id,
                           pad_id=tok.pad_id, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                           generator=generator)
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
            generate(self.model, [ids], max_new_tokens=budget, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=generator,
                     on_tokens=on_tokens)
        except _Stop:
            pass
        response = stream.finish()
        reason = "stop" if stream.stopped else ("eos" if ended else "length")
        return Sample(response, reason, len(stream.ids) + len(ended))


def make_generator(seed: int, device: str = "cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))


# ======================================================================= prompts files


def read_prompts(spec: str, prompt_field: str = "prompt") -> Iterator[dict]:
    """Records with a "prompt" (and any other fields of a .jsonl record) from a prompts spec."""
    if spec.startswith("synthetic:"):
        from lmforge.data.synthetic import SyntheticWorld, strip_prompt_template

        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"prompts={spec!r}: write synthetic:N with N a number of prompts") from None
        for p in SyntheticWorld(0).prompts(n, "test"):
            yield {"prompt": strip_prompt_template(p)}
        return
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"prompts={spec}: no such file (relative paths resolve from {Path.cwd()})")
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield {"prompt": line.rstrip("\r\n")}
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, str):
                obj = {prompt_field: obj}
            if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str):
                raise UsageError(f"{path}:{lineno}: expected an object with a string field {prompt_field!r} "
                                 "(prompt_field=...) or a JSON string")
            record = dict(obj)
            record["prompt"] = record.pop(prompt_field)
            yield record


def render(template: str, prompt: str) -> str:
    from lmforge.data.templates import render_prompt

    return render_prompt(template, prompt)


# ============================================================================= modes


def _settings(cfg: GenerateConfig) -> SamplingSettings:
    s = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(cfg.stop))
    s.check()
    return s


def run_batch(lm: LanguageModel, cfg: GenerateConfig, template: str) -> int:
    s = _settings(cfg)
    records = list(read_prompts(cfg.prompts, cfg.prompt_field))
    if not records:
        raise UsageError(f"prompts={cfg.prompts}: no prompts in it")
    if cfg.n < 1:
        raise UsageError(f"n={cfg.n} must be >= 1")
    jobs = [r for r in records for _ in range(cfg.n)]
    texts = [render(template, r["prompt"]) for r in jobs]
    samples = lm.sample(texts, s, make_generator(cfg.seed, lm.device), cfg.batch_size)
    settings = {**s.as_dict(), "seed": cfg.seed, "template": template, **lm.describe()}
    out = open(cfg.out, "w", encoding="utf-8") if cfg.out else sys.stdout
    try:
        for record, sample in zip(jobs, samples):
            row = {**record, "response": sample.text, "finish_reason": sample.finish_reason,
                   "n_tokens": sample.n_tokens, **settings}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if cfg.out:
        print(f"wrote {len(samples)} responses to {cfg.out}", file=sys.stderr)
    return len(samples)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_single(lm: LanguageModel, cfg: GenerateConfig, template: str) -> Sample:
    s = _settings(cfg)
    text = render(template, cfg.prompt)
    if cfg.stream:
        sample = lm.stream(text, s, _write_stdout, make_generator(cfg.seed, lm.device))
        _write_stdout("\n")
    else:
        sample = lm.sample([text], s, make_generator(cfg.seed, lm.device))[0]
        _write_stdout(sample.text + "\n")
    return sample


def run_chat(lm: LanguageModel, cfg: GenerateConfig, template: str, read: Callable[[str], str] = input) -> list:
    s = _settings(cfg)
    print(f"chat with {lm.path} ({lm.stage} checkpoint); /reset starts over, /quit or Ctrl-D leaves", flush=True)
    dialog, turns = "", []
    gen = make_generator(cfg.seed, lm.device)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print()
            break
        command = line.strip()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            dialog = ""
            print("(dialog cleared)", flush=True)
            continue
        if not command:
            continue
        context = dialog + render(template, line)
        _write_stdout("model>")
        sample = lm.stream(context, s, _write_stdout, gen)
        _write_stdout("\n")
        dialog = context + sample.text + "\n"
        turns.append((line, sample.text))
    return turns


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    from omegaconf import OmegaConf

    composed = compose_cli("generate", argv, schema="generate_schema", free_text=("prompt", "template"))
    if show_cfg:
        print(OmegaConf.to_yaml(composed))
        return None
    if OmegaConf.is_missing(composed, "ckpt"):
        raise UsageError("ckpt=<checkpoint> is required (any stage's .ckpt except a reward model's)")
    cfg: GenerateConfig = OmegaConf.to_object(composed)
    modes = [m for m, on in (("prompt=", cfg.prompt is not None), ("prompts=", cfg.prompts is not None),
                             ("chat=true", cfg.chat)) if on]
    if len(modes) != 1:
        raise UsageError("give exactly one of prompt=\"...\", prompts=<file> or chat=true"
                         + (f" (got {', '.join(modes)})" if modes else ""))
    _settings(cfg)  # bad sampling settings fail before the model loads
    lm = LanguageModel(cfg.ckpt, cfg.device)
    template = "{prompt}" if cfg.raw else decode_escapes(cfg.template) if cfg.template is not None else lm.default_template
    render(template, "x")  # a broken template fails here, with the data layer's message
    if cfg.prompts is not None:
        return run_batch(lm, cfg, template)
    if cfg.chat:
        return run_chat(lm, cfg, template)
    return run_single(lm, cfg, template)


def cli() -> int:
    return run_cli(main, sys.argv[1:], __doc__)


if __name__ == "__main__":
    sys.exit(cli())
