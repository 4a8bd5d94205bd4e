"""Human feedback: label pairs of sampled responses in the browser, export them for the reward stage.

    python -m lmforge.feedback serve ckpt=<ckpt> prompts=<file|synthetic:N> [ckpt_b=<ckpt>]
        [temperature=0.7] [temperature_b=1.2] [port=8000] [host=127.0.0.1] [annotator=<name>] [db=<path>]
    python -m lmforge.feedback export db=<feedback.db> out=pairs.jsonl [keep_ties=false] [keep_both_bad=false]
        [thumbs=true] [aggregate=all|majority]

serve: a local web page shows a prompt and two responses side by side, A (left) and B (right),
from one checkpoint at two temperatures (temperature, temperature_b; default 0.7 and 1.2) or
from two checkpoints (ckpt_b=, both at `temperature` unless temperature_b is given). Keys:
1/a: A is better, 2/b: B is better, 3/t: tie, 4/x: both bad, left/right (or h/l): pick a
response, u/d: thumbs up/down on it, c: comment on it, n: skip, ?: help.

* db: default <run dir of ckpt>/feedback.db (the folder holding checkpoints/), so running the
  same command again continues where the last session stopped. SQLite, WAL mode, one committed
  transaction per judgment.
* host: 127.0.0.1 by default (this machine only). Any other address (host=0.0.0.0 to label
  from other machines) needs token=<secret of 16+ characters> (or token=auto to make one);
  open the printed address with ?token=... once, the page keeps it in a cookie.
* prompts: .txt (one per line), .jsonl (prompt_field, default "prompt") or synthetic:N.
  They are rendered with `template` (default: the checkpoint's data.prompt_template).
* pairs_per_prompt=1, shuffle_sides=true (which system is left is random per item),
  max_new_tokens=64, top_k, top_p, seed, stop=["\\nUser:"], prefetch=4 (items generated
  ahead of the annotator), device=cpu.

export: writes the {prompt, chosen, rejected} JSONL that `python train.py algo=reward
data=jsonl data.path=pairs.jsonl` reads (see lmforge.data.feedback_export for the rules: thumbs
become pairs too; ties and both-bad are left out unless keep_ties / keep_both_bad).
`python train.py algo=reward data=feedback data.db=<feedback.db>` reads the database directly.
"""

from __future__ import annotations

import getpass
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING, OmegaConf

from lmforge.cli import compose_cli, register_schema, run_cli
from lmforge.data.feedback_export import ExportConfig
from lmforge.errors import UsageError

MIN_TOKEN_LEN = 16


@dataclass
class ServeConfig:
    ckpt: str = MISSING
    prompts: str = MISSING
    ckpt_b: Optional[str] = None  # a second checkpoint (default: ckpt at temperature_b)
    temperature: float = 0.7
    temperature_b: Optional[float] = None  # default 1.2 with one checkpoint, else `temperature`
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: int = 64
    stop: List[str] = field(default_factory=lambda: ["\nUser:"])
    template: Optional[str] = None  # default: the checkpoint's data.prompt_template
    raw: bool = False
    prompt_field: str = "prompt"
    pairs_per_prompt: int = 1
    shuffle_sides: bool = True
    prefetch: int = 4
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    annotator: Optional[str] = None  # default: the login name
    db: Optional[str] = None  # default: <run dir of ckpt>/feedback.db
    device: str = "cpu"


@dataclass
class FeedbackConfig:
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


register_schema("feedback_cli_schema", FeedbackConfig)
COMMANDS = ("serve", "export")


def default_db(ckpt: str | Path) -> Path:
    """<run dir>/feedback.db: the run folder holds checkpoints/<name>.ckpt."""
    ckpt = Path(ckpt).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "feedback.db"


def check_access(host: str, token: str | None) -> str | None:
    """The token to require (None: none). Refuses a non-loopback host without a good token."""
    from lmforge.feedback.app import LOOPBACK_HOSTS

    if token == "auto":
        token = secrets.token_urlsafe(24)
    if token is not None and len(token) < MIN_TOKEN_LEN:
        raise UsageError(f"token= must be at least {MIN_TOKEN_LEN} characters (or token=auto)")
    if host not in LOOPBACK_HOSTS and token is None:
        raise UsageError(
            f"host={host} makes the app reachable from other machines: give an access token, e.g. "
            "token=auto (one is made and printed) or token=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))'); or keep the default host=127.0.0.1"
        )
    return token


def load_prompts(spec: str, prompt_field: str) -> list[str]:
    from lmforge.cli import read_prompts

    prompts = [r["prompt"] for r in read_prompts(spec, prompt_field)]
    if not prompts:
        raise UsageError(f"prompts={spec}: no prompts in it")
    return prompts


def build_server(cfg: ServeConfig):
    """(app, session, token, db path) of a serve config: loads the models and the database."""
    from lmforge.cli import decode_escapes
    from lmforge.data.feedback_store import Store
    from lmforge.data.templates import render_prompt as render
    from lmforge.feedback.app import LOOPBACK_HOSTS, FeedbackSession, ModelPairSource, System, create_app
    from lmforge.inference.language_model import LanguageModel, SamplingSettings

    token = check_access(cfg.host, cfg.token)
    prompts = load_prompts(cfg.prompts, cfg.prompt_field)
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(cfg.stop))
    temp_b = cfg.temperature_b if cfg.temperature_b is not None else (cfg.temperature if cfg.ckpt_b else 1.2)
    settings_b = SamplingSettings(cfg.max_new_tokens, temp_b, cfg.top_k, cfg.top_p, tuple(cfg.stop))
    settings.check(), settings_b.check()
    lm = LanguageModel(cfg.ckpt, cfg.device)
    lm_b = LanguageModel(cfg.ckpt_b, cfg.device) if cfg.ckpt_b else lm
    if lm_b is not lm and lm_b.tokenizer != lm.tokenizer:
        print("note: ckpt and ckpt_b use different tokenizers; each samples with its own", file=sys.stderr)
    template = "{prompt}" if cfg.raw else decode_escapes(cfg.template) if cfg.template else lm.default_template
    render(template, "x")
    source = ModelPairSource(System("1", lm, settings, cfg.seed), System("2", lm_b, settings_b, cfg.seed))
    db = Path(cfg.db) if cfg.db else default_db(cfg.ckpt)
    store = Store(db)
    session = FeedbackSession(
        store,
        prompts,
        source,
        template=template,
        pairs_per_prompt=cfg.pairs_per_prompt,
        shuffle_sides=cfg.shuffle_sides,
        prefetch=cfg.prefetch,
        seed=cfg.seed,
    )
    annotator = cfg.annotator or getpass.getuser() or "anonymous"
    hosts = LOOPBACK_HOSTS if cfg.host in LOOPBACK_HOSTS else None
    app = create_app(session, annotator=annotator, token=token, allowed_hosts=hosts)
    return app, session, token, db


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app, session, token, db = build_server(cfg)
    shown = "localhost" if cfg.host in ("127.0.0.1", "::1", "localhost") else cfg.host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{cfg.port}/"
    print(
        f"feedback: {len(session.entries)} items ({len(session.entries) - sum(map(session.generated, session.ids))}"
        f" still to generate), database {db}",
        flush=True,
    )
    print(f"feedback: open {url}{'?token=' + token if token else ''}  (Ctrl-C stops; nothing is lost)", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        session.close()


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"usage: python -m lmforge.feedback {{{'|'.join(COMMANDS)}}} key=value ... (see --help)")
    command, rest = argv[0], argv[1:]
    show_cfg = "--cfg" in rest
    rest = [a for a in rest if a != "--cfg"]
    composed = compose_cli(
        "feedback",
        rest,
        schema="feedback_cli_schema",
        prefix=f"{command}.",
        free_text=("template", "token", "annotator") if command == "serve" else (),
    )
    node = composed[command]
    if show_cfg:
        print(OmegaConf.to_yaml(node))
        return None
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    if missing:
        raise UsageError(f"{command} needs {' '.join(f'{k}=...' for k in missing)}")
    cfg = OmegaConf.to_object(node)
    if command == "serve":
        return serve(cfg)
    from lmforge.data.feedback_export import AGGREGATES, export

    if cfg.aggregate not in AGGREGATES:
        raise UsageError(f"aggregate={cfg.aggregate!r}: use one of {', '.join(AGGREGATES)}")
    summary = export(cfg)
    print(json.dumps(summary))
    return summary


def cli() -> int:
    return run_cli(main, sys.argv[1:], __doc__)


if __name__ == "__main__":
    sys.exit(cli())
