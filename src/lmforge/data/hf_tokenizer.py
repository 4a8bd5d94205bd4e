"""The tokenizer of a Hugging Face model, usable wherever lmforge's own `Tokenizer` is.

`HFTokenizer` wraps a `tokenizers.Tokenizer` (a model's `tokenizer.json`) with the methods
lmforge's stages call -- encode, encode_batch, decode, vocab_size, pad_id, bos_id, eos_id,
id_to_piece, fingerprint, proto()/from_proto() -- plus the model's chat template
(`apply_chat_template`, rendered with jinja2 in a sandbox as transformers does).

Differences from lmforge's `Tokenizer` a caller should know:

* special ids are the model's (Llama: bos 1, eos 2; GPT-2: bos = eos = 50256; Qwen2: no BOS
  at all, so `encode(bos=True)` adds nothing), never lmforge's fixed 0..3;
* a model without a pad token pads with its unk token, else with its EOS. lmforge masks
  padding by attention masks, so this changes nothing in lmforge; an exported reward model
  whose pad id equals its EOS id is read one token early by transformers' sequence
  classification, which export warns about;
* `encode` adds no special tokens (as lmforge's), but special-token strings in the text
  ("<s>", "<|im_start|>") become their ids, so a rendered chat template encodes as the model
  expects.

Checkpoint bytes (`proto()`): MAGIC followed by JSON holding the original tokenizer files
verbatim (tokenizer.json, tokenizer_config.json, ...), so export writes them back unchanged.
MAGIC cannot start a SentencePiece model proto (0x4C is no valid protobuf tag there), so one
byte string tells the two kinds apart: `tokenizer_from_bytes`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MAGIC = b"LMFORGE-HF-TOKENIZER\x00"
_FORMAT = 1
# Tokenizer files carried verbatim from the HF directory and written back on export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_SPECIALS = ("bos", "eos", "pad", "unk")
_LMFORGE_MARK = "lmforge_sentencepiece"


class TokenizerImportError(ValueError):
    """An HF tokenizer that cannot be loaded, with what to do about it."""


def _token_content(value: Any) -> str | None:
    """tokenizer_config's `bos_token` etc.: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerImportError(
            "a Hugging Face tokenizer (tokenizer.json) needs the `tokenizers` package: "
            "pip install 'lmforge[hf]' (or pip install tokenizers)"
        ) from None
    return tokenizers


class HFTokenizer:
    kind = "hf"

    def __init__(self, files: dict[str, str], specials: dict[str, str | None], *, source: str = "<memory>"):
        tokenizers = _require_tokenizers()
        if "tokenizer.json" not in files:
            raise TokenizerImportError(f"{source}: no tokenizer.json")
        self._files = dict(sorted(files.items()))
        self._specials = {k: specials.get(k) for k in _SPECIALS}
        self._source = source
        self._tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        ids = {k: (None if v is None else self._tok.token_to_id(v)) for k, v in self._specials.items()}
        for k, v in self._specials.items():
            if v is not None and ids[k] is None:
                raise TokenizerImportError(f"{source}: the {k} token {v!r} is not in the vocabulary")
        if ids["eos"] is None:
            raise TokenizerImportError(
                f"{source}: no EOS token (tokenizer_config.json eos_token or config.json eos_token_id); "
                "lmforge ends every response with one"
            )
        # No pad token: pad with unk, else EOS (only attention masks decide what is padding).
        ids["pad"] = next(i for i in (ids["pad"], ids["unk"], ids["eos"]) if i is not None)
        self._ids = ids
        self._skip = {i for i in (ids["pad"], ids["bos"], ids["eos"]) if i is not None}
        self._proto = MAGIC + json.dumps(
            {"format": _FORMAT, "files": self._files, "specials": self._specials}, sort_keys=True, ensure_ascii=False
        ).encode("utf-8")
        self._fingerprint = hashlib.sha256(self._proto).hexdigest()
        self._chat_template = _chat_template(self._files)
        self._jinja = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, directory: str | Path, hf_config: dict[str, Any] | None = None) -> HFTokenizer:
        """The tokenizer of an HF model directory (tokenizer.json; special tokens from
        tokenizer_config.json / special_tokens_map.json, else from config.json's ids)."""
        directory = Path(directory)
        files = {n: (directory / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES if (directory / n).is_file()}
        if "tokenizer.json" not in files:
            raise TokenizerImportError(f"{directory}: no tokenizer.json")
        specials = _special_tokens(files, hf_config or {})
        return cls(files, specials, source=str(directory))

    @classmethod
    def from_proto(cls, blob: bytes, *, source: str = "<memory>") -> HFTokenizer:
        if not blob.startswith(MAGIC):
            raise TokenizerImportError(f"{source}: not an lmforge HF-tokenizer blob")
        payload = json.loads(blob[len(MAGIC) :].decode("utf-8"))
        if payload.get("format") != _FORMAT:
            raise TokenizerImportError(f"{source}: HF-tokenizer format {payload.get('format')}, expected {_FORMAT}")
        return cls(payload["files"], payload["specials"], source=source)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """1 + the largest id (added tokens included); the model's embedding may be larger."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def special_tokens(self) -> dict[str, str | None]:
        return dict(self._specials)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def files(self) -> dict[str, str]:
        return dict(self._files)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer`."""
        return self._tok

    # ------------------------------------------------------------------ encoding
    def _add_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._add_specials(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        # num_threads: for lmforge Tokenizer compatibility; `tokenizers` sizes its own pool
        # (RAYON_NUM_THREADS).
        out = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._add_specials(e.ids, bos, eos) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; pad/bos/eos and ids outside the vocabulary are skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        kept = [i for i in map(int, ids) if i not in self._skip and 0 <= i < self._vocab_size]
        return self._tok.decode(kept, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """The model's chat template rendered for `messages` ([{"role": ..., "content": ...}]).
        Encode the result with `encode` (special-token strings in it become their ids)."""
        if self._chat_template is None:
            raise TokenizerImportError(f"{self._source}: this tokenizer has no chat_template")
        if self._jinja is None:
            self._jinja = compile_template(self._chat_template)
        names = {f"{k}_token": (v or "") for k, v in self._specials.items()}
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt, **names, **kwargs)

    # ------------------------------------------------------------------ persistence
    def proto(self) -> bytes:
        return self._proto

    def save_pretrained(self, out: str | Path) -> list[str]:
        """Write the tokenizer files back as they came (transformers' AutoTokenizer reads them)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self._files.items():
            (out / name).write_text(text, encoding="utf-8")
        return list(self._files)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self._proto == other._proto

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
            f"sha256={self._fingerprint[:12]}, source={self._source!r})"
        )

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(HFTokenizer.from_proto(state["proto"], source=state["source"]).__dict__)


# ============================================================================ helpers


def _special_tokens(files: dict[str, str], hf_config: dict[str, Any]) -> dict[str, str | None]:
    cfg = json.loads(files.get("tokenizer_config.json", "{}"))
    smap = json.loads(files.get("special_tokens_map.json", "{}"))
    out: dict[str, str | None] = {}
    for k in _SPECIALS:
        out[k] = _token_content(cfg.get(f"{k}_token")) or _token_content(smap.get(f"{k}_token"))
    # Fall back to config.json's ids (the first of a list: Llama 3 instruct lists several EOS).
    tok = json.loads(files["tokenizer.json"])
    by_id = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        by_id = {**{i: p for p, i in vocab.items()}, **by_id}
    for k in ("bos", "eos", "pad"):
        token_id = hf_config.get(f"{k}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if out[k] is None and token_id is not None:
            out[k] = by_id.get(int(token_id))
    return out


def _chat_template(files: dict[str, str]) -> str | None:
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"]
    if "chat_template.json" in files:
        return json.loads(files["chat_template.json"]).get("chat_template")
    template = json.loads(files.get("tokenizer_config.json", "{}")).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def tokenizer_from_bytes(blob: bytes, *, source: str = "<memory>"):
    """The tokenizer stored in a checkpoint: an HFTokenizer (MAGIC prefix) or a SentencePiece
    lmforge Tokenizer."""
    if blob.startswith(MAGIC):
        return HFTokenizer.from_proto(blob, source=source)
    from lmforge.data.tokenizer import Tokenizer

    return Tokenizer.from_proto(blob, source=source)


# ============================================================================ directories


def load_hf_tokenizer(directory: str | Path, hf_config: dict[str, Any] | None = None):
    """The tokenizer of an HF model directory:

    * a tokenizer lmforge exported (tokenizer_config.json marks it) -> lmforge's own
      SentencePiece Tokenizer from tokenizer.model, byte for byte the one it was trained as;
    * tokenizer.json -> HFTokenizer;
    * only a tokenizer.model with lmforge's ids (pad 0, bos 1, eos 2, unk 3) -> lmforge's
      Tokenizer;
    * any other tokenizer.model -> converted to tokenizer.json by transformers (installed)."""
    directory = Path(directory)
    spm_path = directory / "tokenizer.model"
    config_path = directory / "tokenizer_config.json"
    exported_by_lmforge = config_path.is_file() and json.loads(config_path.read_text()).get(_LMFORGE_MARK)
    if (directory / "tokenizer.json").is_file() and not exported_by_lmforge:
        return HFTokenizer.from_dir(directory, hf_config)
    if not spm_path.is_file():
        raise TokenizerImportError(f"{directory}: no tokenizer.json or tokenizer.model")
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.errors import DataError

    try:
        return Tokenizer.load(spm_path)
    except DataError:
        if exported_by_lmforge:
            raise
        # not lmforge's special ids: a third-party SentencePiece model
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerImportError(
            f"{spm_path}: a SentencePiece tokenizer without tokenizer.json; converting it needs transformers "
            "(pip install 'lmforge[hf]')"
        ) from None
    fast = AutoTokenizer.from_pretrained(str(directory))
    files = {n: (directory / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES if (directory / n).is_file()}
    files["tokenizer.json"] = fast.backend_tokenizer.to_str()
    specials = {k: getattr(fast, f"{k}_token", None) for k in _SPECIALS}
    return HFTokenizer(files, specials, source=str(directory))


def save_lmforge_tokenizer(tokenizer, out: str | Path, model_max_length: int) -> list[str]:
    """lmforge's SentencePiece Tokenizer as an HF `LlamaTokenizer`: tokenizer.model (its very
    proto) and configs that keep lmforge's encoding (no added BOS/EOS, no dummy prefix space).
    With transformers installed, also tokenizer.json, written only when it encodes a probe
    text exactly as lmforge does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.model")
    names = {k: tokenizer.id_to_piece(getattr(tokenizer, f"{k}_id")) for k in _SPECIALS}
    specials = {f"{k}_token": v for k, v in names.items()}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
        _LMFORGE_MARK: True,  # import takes tokenizer.model back as lmforge's own Tokenizer
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    written = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return written
    fast = AutoTokenizer.from_pretrained(str(out))
    probe = "Hello  world\n\tcode(x) 中文 🚀 end "
    if fast.encode(probe, add_special_tokens=False) == tokenizer.encode(probe):
        (out / "tokenizer.json").write_text(fast.backend_tokenizer.to_str(), encoding="utf-8")
        written.append("tokenizer.json")
    return written


# ======================================================================== chat templates


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
