"""Convert between Hugging Face model directories and lmforge checkpoints.

    python -m lmforge.convert import <hf_model_dir> out=<dir> [max_seq_len=N] [name=NAME]
        -> <dir>/lmforge.ckpt (stage "pretrain", or "reward" for a one-label sequence
           classifier), <dir>/conf/model/NAME.yaml and, when the tokenizer has a chat template,
           <dir>/conf/chat/NAME.yaml (data.prompt_template in the model's chat format); train with
           python train.py --config-dir <dir>/conf model=NAME [+chat=NAME] init_from=<dir> ...
    python -m lmforge.convert config <hf_model_dir> out=<dir> [max_seq_len=N] [name=NAME]
        -> only the configs (no weights), for init_from=<hf_model_dir> directly
    python -m lmforge.convert export <checkpoint.ckpt> out=<dir> [model_type=llama|mistral|qwen2|gpt2]
                                     [dtype=float32|bfloat16|float16] [max_shard_gb=5]
        -> an HF directory: AutoModelForCausalLM (reward checkpoints:
           AutoModelForSequenceClassification, num_labels=1) and AutoTokenizer load it

Supported: model_type llama (Llama 1-3, TinyLlama, SmolLM), mistral, qwen2 (Qwen2/2.5), gpt2.
"""

from __future__ import annotations

import json
import sys

from lmforge.errors import UsageError

USAGE = __doc__


_OPTIONS = {
    "import": {"out", "max_seq_len", "name"},
    "config": {"out", "max_seq_len", "name"},
    "export": {"out", "model_type", "dtype", "max_shard_gb"},
}


def parse(argv: list[str]) -> tuple[str, str, dict[str, str]]:
    if len(argv) < 2 or argv[0] not in _OPTIONS:
        raise UsageError("expected `import|config|export <path> out=<dir> [key=value ...]`")
    command, source, options = argv[0], argv[1], {}
    for arg in argv[2:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key not in _OPTIONS[command]:
            raise UsageError(f"unknown option {key!r} for {command}; options: {', '.join(sorted(_OPTIONS[command]))}")
        options[key] = value
    if "out" not in options:
        raise UsageError(f"{command} needs out=<dir>")
    return command, source, options


def run(argv: list[str]) -> dict:
    command, source, opt = parse(argv)
    if command in ("import", "config"):
        from lmforge.hf.importer import import_to_dir

        max_seq_len = int(opt["max_seq_len"]) if "max_seq_len" in opt else None
        result = import_to_dir(source, opt["out"], max_seq_len=max_seq_len, name=opt.get("name"),
                               weights=command == "import")  # fmt: skip
        name = result["model_config"].rsplit("/", 1)[-1].removesuffix(".yaml")
        start = f"python train.py --config-dir {opt['out']}/conf model={name}" + (
            " +chat=" + name if "chat_config" in result else ""
        )
        init = opt["out"] if command == "import" else source
        if result["stage"] == "reward":
            # An imported reward model has no reward statistics to normalize with: raw scores.
            result["train"] = (
                f"{start} algo=ppo init_from=<SFT checkpoint> "
                f"'algo.reward.sources=[{{ckpt:{init}/lmforge.ckpt,normalize:false}}]' ..."
            )
        else:
            result["train"] = f"{start} algo=sft init_from={init} ..."
        return result
    from lmforge.hf.exporter import export_hf

    shard = int(float(opt.get("max_shard_gb", 5)) * 2**30)
    return export_hf(
        source, opt["out"], model_type=opt.get("model_type"), dtype=opt.get("dtype"), max_shard_bytes=shard
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from lmforge.data.hf_tokenizer import TokenizerImportError
    from lmforge.hf.hf_config import UnsupportedModelError
    from lmforge.training.checkpoint import CheckpointError

    try:
        result = run(argv)
    except UsageError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    except (UnsupportedModelError, TokenizerImportError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
