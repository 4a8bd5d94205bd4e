"""The synthetic world's tasks: the eight task kinds, their prompts and answers, the operand
ranges of the world and of its harder split, the dialog template, and parsing a prompt back into
its task.

Pure definitions with no randomness: :mod:`lmforge.world.splits` assigns every prompt its split,
:mod:`lmforge.world.generator` samples from them, and :mod:`lmforge.world.judge` parses prompts
with them.

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
palindromes, so a reversal never equals its input). These ranges make the world's 1,723
distinct prompts, split into train, val and test by :func:`lmforge.world.splits.split_of`.

The ``hard`` split has longer numbers than any of them (:func:`enumerate_hard`), the same
templates and answers::

    add, sub, compare   both operands 21..99 (sub: a >= b; compare: a != b)
    mul                 an operand 10..12, the other 1..12
    next                100..999

The word kinds have no hard prompts: a longer word would be a word the world does not have,
an unseen fact rather than a harder use of a skill.

Dialog format
-------------
The canonical rendering, used by every stage, is
``format_prompt(prompt) == PROMPT_TEMPLATE.format(prompt=prompt)`` ==
``"User: {prompt}\\nAssistant:"`` followed by the response ``" " + answer``.
The SFT stage appends EOS itself; this module knows nothing about tokens.
A dialog inside a pretraining document is ``format_prompt(p) + response + "\\n"``,
i.e. exactly an SFT (prompt_text, response_text) pair followed by a newline.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "NUMERIC_KINDS",
    "WORD_KINDS",
    "WORD_OPERAND_KINDS",
    "WORDS",
    "SMALL",
    "DIGITS",
    "COUNTING",
    "PROMPT_TEMPLATE",
    "Task",
    "format_prompt",
    "strip_prompt_template",
    "parse_task",
    "in_world",
    "enumerate_kind",
    "enumerate_hard",
    "parse_dialogs",
]

PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"

KINDS: tuple[str, ...] = ("add", "sub", "mul", "compare", "reverse", "upper", "length", "next")
# Kinds whose ANSWER is a word (the judge scores them as words); `length` has a word operand and
# a numeric answer, so it is numeric here and a word-operand kind below.
WORD_KINDS: frozenset[str] = frozenset({"reverse", "upper"})
NUMERIC_KINDS: frozenset[str] = frozenset(KINDS) - WORD_KINDS
WORD_OPERAND_KINDS: tuple[str, ...] = ("reverse", "upper", "length")

# Operand ranges of the world (train, val and test prompts).
SMALL = range(0, 21)  # add, sub, compare
DIGITS = range(1, 10)  # mul
COUNTING = range(0, 100)  # next
# ... and of the hard split: longer numbers than any of the above.
_HARD_SMALL = range(21, 100)  # add, sub, compare
_HARD_FACTORS = range(1, 13)  # mul: one operand >= 10
_HARD_COUNTING = range(100, 1000)  # next

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
_WORD_SET = frozenset(WORDS)

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
    if kind in WORD_OPERAND_KINDS:
        prompt = _TEMPLATES[kind].format(w=args[0])
    elif kind == "next":
        prompt = _TEMPLATES[kind].format(a=args[0])
    else:
        prompt = _TEMPLATES[kind].format(a=args[0], b=args[1])
    return Task(kind, prompt, _answer(kind, args))


@functools.lru_cache(maxsize=1 << 15)
def _parse(prompt: str) -> tuple[Task, tuple]:
    raw = strip_prompt_template(prompt)
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(raw)
        if m:
            args = tuple(g if kind in WORD_OPERAND_KINDS else int(g) for g in m.groups())
            return Task(kind, raw, _answer(kind, args)), args
    raise ValueError(f"cannot parse a synthetic-world task from prompt {prompt!r}")


def parse_task(prompt: str) -> Task:
    """Parse a (raw or formatted) prompt back into its :class:`Task`; ValueError if impossible."""
    return _parse(prompt)[0]


def in_world(kind: str, args: tuple) -> bool:
    """Whether a task's operands are in the world's ranges (its train, val and test prompts)."""
    if kind in WORD_OPERAND_KINDS:
        return args[0] in _WORD_SET
    if kind == "next":
        return args[0] in COUNTING
    a, b = args
    if kind == "mul":
        return a in DIGITS and b in DIGITS
    in_range = a in SMALL and b in SMALL
    if kind == "sub":
        return in_range and a >= b
    if kind == "compare":
        return in_range and a != b
    return in_range


def _pairs(kind: str, values: range) -> list[tuple[int, int]]:
    """The operand pairs of a two-operand kind over ``values`` (sub: a >= b, compare: a != b)."""
    pairs = [(a, b) for a in values for b in values]
    if kind == "sub":
        return [(a, b) for a, b in pairs if a >= b]
    if kind == "compare":
        return [(a, b) for a, b in pairs if a != b]
    return pairs


def enumerate_kind(kind: str) -> list[Task]:
    """Every task of ``kind`` in the world's ranges (train, val and test), in a fixed order."""
    if kind in ("add", "sub", "compare"):
        return [_make_task(kind, a, b) for a, b in _pairs(kind, SMALL)]
    if kind == "mul":
        return [_make_task(kind, a, b) for a, b in _pairs(kind, DIGITS)]
    if kind in WORD_OPERAND_KINDS:
        return [_make_task(kind, w) for w in WORDS]
    if kind == "next":
        return [_make_task(kind, a) for a in COUNTING]
    raise ValueError(f"unknown task kind {kind!r}")


def enumerate_hard(kind: str) -> list[Task]:
    """Every task of ``kind`` in the hard split (longer numbers; none for the word kinds)."""
    if kind in ("add", "sub", "compare"):
        return [_make_task(kind, a, b) for a, b in _pairs(kind, _HARD_SMALL)]
    if kind == "mul":
        pairs = _pairs(kind, _HARD_FACTORS)
        return [_make_task(kind, a, b) for a, b in pairs if max(a, b) >= 10]
    if kind in WORD_OPERAND_KINDS:
        return []
    if kind == "next":
        return [_make_task(kind, a) for a in _HARD_COUNTING]
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
