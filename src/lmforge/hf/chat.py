"""Chat templates: rendering a model's Jinja `chat_template` as transformers does, and turning
it into lmforge's `data.prompt_template`."""

from __future__ import annotations

import json

from lmforge.hf.tokenizer import HFTokenizer, TokenizerImportError


def compile_template(template: str):
    """A jinja2 template in transformers' environment: sandboxed (templates from the Hub are
    untrusted), trim_blocks/lstrip_blocks, loop controls, tojson/raise_exception/strftime_now."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerImportError("rendering a chat template needs jinja2: pip install 'jinja2>=3.1.6'") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def prompt_template_from_chat(tokenizer: HFTokenizer, system: str | None = None) -> str:
    """The model's chat template for one user turn + the assistant's opening, as lmforge's
    `data.prompt_template` (a str.format template with {prompt}). Special-token strings in it
    ("<|im_start|>", "<|begin_of_text|>") encode as their ids; the response then ends with the
    tokenizer's EOS, which is the chat format's end-of-turn token for chat models."""
    sentinel = "\x00lmforge-prompt\x00"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": sentinel}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if text.count(sentinel) != 1:
        raise TokenizerImportError("the chat template does not render the user message verbatim exactly once")
    return text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{prompt}")
