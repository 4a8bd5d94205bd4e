"""The synthetic world's tasks: the eight task kinds, their prompts and answers, the dialog
template, the train/val/test split of every prompt, and parsing a prompt back into its task.

Pure definitions with no randomness: :mod:`lmforge.world.generator` samples from them, and
:mod:`lmforge.world.judge` parses prompts with them.

Tasks
-----
Eight kinds, each with one prompt template and small operands::

    add      "What is 7 + 12?"                 -> "19"     (operands 0..20)
    sub      "What is 15 - 6?"                 -> "9"      (0..20, a >= b)
    mul      "What is 3 * 7?"                  -> "21"     (1..9)
    compare  "Which is larger, 14 or 9?"       -> "14"     (0..20, a != b)
    reverse  "Reverse the word: lemon"         -> "nomel"  (WORDS)
    upper    "Uppercase: lemon"                -> "LEMON"  (WORDS)
    length   "How many letters are in lemon?"  -> "5"      (WORDS)
    next     "What comes after 17?"            -> "18"     (0..99)

``WORDS`` is an embedded list of 150 common English words of 3-7 letters (no
palindromes, so a reversal never equals its input). The whole world holds
1,723 distinct prompts (1,377 train, 186 val, 160 test); they are enumerated
once per kind, in a fixed order, when a :class:`~lmforge.world.generator.SyntheticWorld` is built.

Dialog format
-------------
The canonical rendering, used by every stage, is
``format_prompt(prompt) == PROMPT_TEMPLATE.format(prompt=prompt)`` ==
``"User: {prompt}\\nAssistant:"`` followed by the response ``" " + answer``.
The SFT stage appends EOS itself; this module knows nothing about tokens.
A dialog inside a pretraining document is ``format_prompt(p) + response + "\\n"``,
i.e. exactly an SFT (prompt_text, response_text) pair followed by a newline.

Splits
------
Every distinct prompt belongs to exactly one split, decided by a stable hash of
the raw prompt string (SHA-256, never Python's salted ``hash()``): ``train``
80%, ``val`` 10%, ``test`` 10% (:func:`split_of`). The split does not depend on
the world's seed, so the held-out ``test`` prompts stay held out whatever seed a
stage uses. Pretraining documents (dialogs and prose facts alike) are drawn from
``train`` only.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "NUMERIC_KINDS",
    "WORD_KINDS",
    "WORDS",
    "SPLITS",
    "PROMPT_TEMPLATE",
    "Task",
    "format_prompt",
    "strip_prompt_template",
    "split_of",
    "parse_task",
    "parse_dialogs",
]

PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"

KINDS: tuple[str, ...] = ("add", "sub", "mul", "compare", "reverse", "upper", "length", "next")
WORD_KINDS: frozenset[str] = frozenset({"reverse", "upper"})
NUMERIC_KINDS: frozenset[str] = frozenset(KINDS) - WORD_KINDS

# (name, cumulative upper bound of the hash fraction)
SPLITS: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.9), ("test", 1.0))
_SPLIT_NAMES = tuple(name for name, _ in SPLITS)

# fmt: off
WORDS: tuple[str, ...] = (
    "apple", "baker", "beach", "bread", "brick", "cable", "camel", "candy", "chair", "chalk",
    "cheese", "cloud", "clock", "coast", "cotton", "crane", "dance", "dinner", "doctor", "dream",
    "eagle", "earth", "field", "flame", "flower", "forest", "frog", "garden", "glass", "grape",
    "green", "guitar", "horse", "house", "island", "jacket", "jelly", "kettle", "kitten", "ladder",
    "lemon", "light", "lion", "magnet", "mango", "maple", "market", "meadow", "metal", "mirror",
    "money", "monkey", "motor", "music", "needle", "night", "ocean", "orange", "paper", "parrot",
    "pencil", "pepper", "piano", "pillow", "planet", "plate", "pocket", "potato", "rabbit", "river",
    "rocket", "salad", "sand", "school", "shadow", "sheep", "shell", "silver", "snake", "spoon",
    "stone", "storm", "sugar", "summer", "table", "tiger", "tomato", "train", "tree", "turtle",
    "valley", "violin", "wagon", "water", "window", "winter", "wolf", "yellow", "zebra", "bird",
    "boat", "book", "cake", "card", "cat", "dog", "door", "duck", "fish", "game",
    "gold", "hat", "king", "lamp", "leaf", "milk", "moon", "nest", "park", "rain",
    "ring", "road", "rose", "salt", "ship", "shoe", "snow", "star", "sun", "tea",
    "toy", "wind", "wood", "bell", "coin", "corn", "farm", "goat", "hill", "kite",
    "lake", "map", "owl", "pear", "pig", "pond", "queen", "rope", "seed", "sock",
)
# fmt: on

_TEMPLATES = {
    "add": "What is {a} + {b}?",
    "sub": "What is {a} - {b}?",
    "mul": "What is {a} * {b}?",
    "compare": "Which is larger, {a} or {b}?",
    "reverse": "Reverse the word: {w}",
    "upper": "Uppercase: {w}",
    "length": "How many letters are in {w}?",
    "next": "What comes after {a}?",
}

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("add", re.compile(r"What is (\d+) \+ (\d+)\?")),
    ("sub", re.compile(r"What is (\d+) - (\d+)\?")),
    ("mul", re.compile(r"What is (\d+) \* (\d+)\?")),
    ("compare", re.compile(r"Which is larger, (\d+) or (\d+)\?")),
    ("reverse", re.compile(r"Reverse the word: ([A-Za-z]+)")),
    ("upper", re.compile(r"Uppercase: ([A-Za-z]+)")),
    ("length", re.compile(r"How many letters are in ([A-Za-z]+)\?")),
    ("next", re.compile(r"What comes after (\d+)\?")),
)

# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One instruction task: its kind, the user's prompt and the expected answer."""

    kind: str
    prompt: str
    answer: str


def format_prompt(prompt: str) -> str:
    """Render a task prompt in the canonical dialog template."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def strip_prompt_template(prompt: str) -> str:
    """Return the raw task prompt from a raw or formatted prompt.

    Accepts ``"What is 7 + 12?"``, ``"User: What is 7 + 12?\\nAssistant:"``, and a
    formatted prompt preceded by earlier dialogs (the last ``User:`` turn counts).
    """
    s = prompt.strip()
    if s.endswith("Assistant:"):
        s = s[: -len("Assistant:")].rstrip()
    idx = s.rfind("User:")
    if idx >= 0:
        s = s[idx + len("User:") :]
    return s.strip()


def _answer(kind: str, args: tuple) -> str:
    if kind == "add":
        return str(args[0] + args[1])
    if kind == "sub":
        return str(args[0] - args[1])
    if kind == "mul":
        return str(args[0] * args[1])
    if kind == "compare":
        return str(max(args))
    if kind == "reverse":
        return args[0][::-1]
    if kind == "upper":
        return args[0].upper()
    if kind == "length":
        return str(len(args[0]))
    if kind == "next":
        return str(args[0] + 1)
    raise ValueError(f"unknown task kind {kind!r}")


def _make_task(kind: str, *args) -> Task:
    if kind in ("reverse", "upper", "length"):
        prompt = _TEMPLATES[kind].format(w=args[0])
    elif kind == "next":
        prompt = _TEMPLATES[kind].format(a=args[0])
    else:
        prompt = _TEMPLATES[kind].format(a=args[0], b=args[1])
    return Task(kind, prompt, _answer(kind, args))


@functools.lru_cache(maxsize=1 << 14)
def _parse(prompt: str) -> tuple[Task, tuple]:
    raw = strip_prompt_template(prompt)
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(raw)
        if m:
            args = tuple(g if kind in ("reverse", "upper", "length") else int(g) for g in m.groups())
            return Task(kind, raw, _answer(kind, args)), args
    raise ValueError(f"cannot parse a synthetic-world task from prompt {prompt!r}")


def parse_task(prompt: str) -> Task:
    """Parse a (raw or formatted) prompt back into its :class:`Task`; ValueError if impossible."""
    return _parse(prompt)[0]


@functools.lru_cache(maxsize=1 << 16)
def split_of(prompt: str) -> str:
    """The split ("train", "val" or "test") of a prompt, from a stable SHA-256 hash.

    A formatted prompt is reduced to its raw task prompt first, so both agree.
    """
    raw = strip_prompt_template(prompt)
    digest = hashlib.sha256(raw.encode("utf-8")).digest()
    frac = int.from_bytes(digest[:8], "big") / 2**64
    for name, upper in SPLITS:
        if frac < upper:
            return name
    return SPLITS[-1][0]


def _enumerate_kind(kind: str) -> list[Task]:
    small = range(21)
    if kind == "add":
        return [_make_task(kind, a, b) for a in small for b in small]
    if kind == "sub":
        return [_make_task(kind, a, b) for a in small for b in small if a >= b]
    if kind == "mul":
        return [_make_task(kind, a, b) for a in range(1, 10) for b in range(1, 10)]
    if kind == "compare":
        return [_make_task(kind, a, b) for a in small for b in small if a != b]
    if kind in ("reverse", "upper", "length"):
        return [_make_task(kind, w) for w in WORDS]
    if kind == "next":
        return [_make_task(kind, a) for a in range(100)]
    raise ValueError(f"unknown task kind {kind!r}")


def parse_dialogs(document: str) -> list[tuple[str, str]]:
    """Split a pretraining document into (task prompt, response) pairs.

    The response keeps its leading space (``" 19"``) and any extra lines; prose
    documents (no ``User:`` turn) yield an empty list.
    """
    out = []
    for chunk in re.split(r"(?m)^User: ", document)[1:]:
        prompt, sep, response = chunk.partition("\nAssistant:")
        if not sep:
            continue
        if response.endswith("\n"):
            response = response[:-1]
        out.append((prompt, response))
    return out
