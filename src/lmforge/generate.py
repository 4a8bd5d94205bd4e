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

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from omegaconf import MISSING

from lmforge.cli import compose_cli, decode_escapes, read_prompts, register_schema, run_cli
from lmforge.errors import UsageError
from lmforge.inference.language_model import (
    LanguageModel,
    Sample,
    SamplingSettings,
    make_generator,
)

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
            row = {
                **record,
                "response": sample.text,
                "finish_reason": sample.finish_reason,
                "n_tokens": sample.n_tokens,
                **settings,
            }
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
    modes = [
        m
        for m, on in (
            ("prompt=", cfg.prompt is not None),
            ("prompts=", cfg.prompts is not None),
            ("chat=true", cfg.chat),
        )
        if on
    ]
    if len(modes) != 1:
        raise UsageError(
            'give exactly one of prompt="...", prompts=<file> or chat=true'
            + (f" (got {', '.join(modes)})" if modes else "")
        )
    _settings(cfg)  # bad sampling settings fail before the model loads
    lm = LanguageModel(cfg.ckpt, cfg.device)
    template = (
        "{prompt}" if cfg.raw else decode_escapes(cfg.template) if cfg.template is not None else lm.default_template
    )
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
