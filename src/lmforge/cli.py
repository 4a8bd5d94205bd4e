"""What the command-line entry points share (`python -m lmforge.generate|convert|score|feedback`):
composing a command's typed config from `key=value` arguments as `@hydra.main` would, reading a
`prompts=` spec, and printing a user error as one line (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from lmforge.errors import UsageError

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


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


def check_keys(argv: list[str], schema: type) -> None:
    """An unknown key as one line naming the schema's options (Hydra's own message takes two and
    suggests `+key=`, which the typed config would refuse anyway)."""
    from dataclasses import fields

    options = [f.name for f in fields(schema)]
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and key.lstrip("+~") not in options:
            raise UsageError(f"unknown option {key!r}; options: {', '.join(options)}")


def compose_command(name: str, schema: type, argv: list[str], required: dict[str, str], purpose: str = ""):
    """A `python -m lmforge.<name>` command's typed config object from argv (unknown keys and
    missing `required` keys refused as one line: {key: what to give}, and what they are for); None after `--cfg`
    printed the composed config."""
    from omegaconf import OmegaConf

    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    check_keys(argv, schema)
    composed = compose_cli(name, argv, schema=f"{name}_schema")
    if show_cfg:
        print(OmegaConf.to_yaml(composed))
        return None
    missing = [k for k in required if OmegaConf.is_missing(composed, k)]
    if missing:
        raise UsageError(
            f"give {' and '.join(f'{k}={required[k]}' for k in missing)}" + (f" ({purpose})" if purpose else "")
        )
    return OmegaConf.to_object(composed)


def run_cli(main: Callable[[list[str]], Any], argv: list[str], doc: str) -> int:
    """Shared CLI wrapper: --help, and user errors as one message (exit 2), not a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmforge.errors import DataError
    from lmforge.training.checkpoint import CheckpointError

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


# ======================================================================= prompts files


def read_prompts(spec: str, prompt_field: str = "prompt") -> Iterator[dict]:
    """Records with a "prompt" (and any other fields of a .jsonl record) from a prompts spec."""
    if spec.startswith("synthetic:"):
        from lmforge.world.generator import SyntheticWorld
        from lmforge.world.tasks import strip_prompt_template

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
                raise UsageError(
                    f"{path}:{lineno}: expected an object with a string field {prompt_field!r} "
                    "(prompt_field=...) or a JSON string"
                )
            record = dict(obj)
            record["prompt"] = record.pop(prompt_field)
            yield record
