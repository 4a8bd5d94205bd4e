"""The embedded synthetic world: lmforge's default data, with a ground-truth judge.

A deterministic, procedurally generated world of short instruction tasks with
checkable answers. It needs no file and no network, and it is sized so that
every stage (pretraining -> SFT -> reward modeling -> PPO) shows a measurable
effect with a ~10M-parameter model on a small CPU in minutes.

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
once per kind, in a fixed order, when a :class:`SyntheticWorld` is built.

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

Improvement over "draw until one falls in the split": since the prompt space is
small and finite, the world enumerates each kind's prompts per split up front
and samples a task as *kind uniformly, then a prompt of that kind uniformly
within the split*. That is the same distribution as rejection sampling with
uniform kinds, costs O(1) per draw, and makes ``tasks(n)[:k] == tasks(k)``
(prefix-stable) for the same arguments. :meth:`SyntheticWorld.all_tasks` lists
a whole split (e.g. the 160 test prompts for a full held-out evaluation).

Determinism
-----------
Every sampling method builds its own ``random.Random`` from a string naming the
world's seed, the method (stream), the split and ``seed_offset``; string seeds
go through SHA-512, so the results are identical across processes and Python
runs whatever ``PYTHONHASHSEED`` is. Different methods use different streams.

Corruptions (what human feedback fixes)
---------------------------------------
:func:`corrupt` produces a wrong or low-quality answer text in one of five
failure modes: ``wrong_value`` (off-by-one or random number; partial reversal,
the untouched word, lowercase/capitalized/half-uppercase, the wrong transform,
another word), ``ramble`` ("I think it is 19, or maybe 20."), ``junk`` (the
answer repeated on one line, or followed by extra lines), ``refuse``
("I don't know.") and ``empty`` ("", "...", "hmm"). A corruption never equals the
answer after stripping, so it always judges < 1.0 (see below).

The ground-truth judge
----------------------
:func:`judge` (``prompt``, ``response``) -> score in [0, 1], a pure function.
``prompt`` may be the raw task prompt or a formatted one (the template is
stripped; if several dialogs precede it, the last ``User:`` turn counts). The
task is parsed back with regexes (:func:`parse_task`); an unparseable prompt
raises ``ValueError``. Scoring (:func:`score_response`):

* strip the response; empty -> 0.0; the *answer part* is its first line;
* answer part == expected exactly -> 1.0 (before the penalties below), so the
  score is 1.0 exactly when ``response.strip() == answer``;
* numeric kinds (add, sub, mul, compare, length, next): if the first integer in
  the answer part equals the expected -> 0.6 (extra words cost the other 0.4);
  otherwise closeness credit ``0.3 * max(0, 1 - |diff| / 5)``; no number -> 0.0;
* word kinds (reverse, upper): the expected word appearing as a whole word in
  the answer part -> 0.6; otherwise ``0.5 * similarity`` where similarity is the
  mean of the case-sensitive and case-insensitive ``difflib.SequenceMatcher``
  ratios (so "lemon" for "Uppercase: lemon" earns 0.25 rather than 0: the dense
  reward sees that the letters are right and only the case is wrong);
* penalties, cumulative: any text on later lines -0.2; a response longer than
  ``3 * len(expected) + 10`` characters -0.2; clipped at 0, rounded to 6 places.

:func:`judge_batch` and :func:`ground_truth_reward` apply it to lists; the latter
is the reward callable configs name as
``_target_: lmforge.world.synthetic.ground_truth_reward`` (with Hydra's
``_partial_: true``, or instantiate :class:`GroundTruthReward` instead).

Preference pairs and annotator noise
------------------------------------
:meth:`SyntheticWorld.preference_pairs` samples two distinct candidate responses
for a task (:meth:`SyntheticWorld.candidate_response`: correct with probability
0.4, else a corruption), scores both with the judge, skips ties, and lets a
simulated Bradley-Terry annotator pick: A is preferred with probability
``sigmoid((s_A - s_B) / noise)``. ``noise`` is a temperature in judge-score
units: ``noise = 0`` always picks the higher-scored response; at ``noise = 0.1``
a score gap of 0.2 is labelled right ~88% of the time; ``noise >> 1`` tends to
coin flips. ``chosen_score``/``rejected_score`` are the true judge scores, so
label agreement is ``mean(chosen_score > rejected_score)``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "KINDS",
    "NUMERIC_KINDS",
    "WORD_KINDS",
    "WORDS",
    "SPLITS",
    "PROMPT_TEMPLATE",
    "Task",
    "SyntheticWorld",
    "format_prompt",
    "strip_prompt_template",
    "split_of",
    "parse_task",
    "parse_dialogs",
    "corrupt",
    "score_response",
    "judge",
    "judge_batch",
    "ground_truth_reward",
    "GroundTruthReward",
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

# Plain descriptive sentences (correct facts) for some language variety.
_PROSE = {
    "add": ("{a} plus {b} is {c}.", "If you add {a} and {b} you get {c}."),
    "sub": ("{a} minus {b} is {c}.", "Take {b} away from {a} and {c} is left."),
    "mul": ("{a} times {b} is {c}.", "{a} groups of {b} make {c}."),
    "compare": ("{c} is larger than {d}.", "Between {a} and {b}, the larger one is {c}."),
    "reverse": ("The word {w} backwards is {c}.", "Read {w} from the end and you get {c}."),
    "upper": ("The word {w} in capital letters is {c}.", "Written in uppercase, {w} is {c}."),
    "length": ("The word {w} has {c} letters.", "There are {c} letters in {w}."),
    "next": ("The number after {a} is {c}.", "{a} is followed by {c}."),
}

_RAMBLES = (
    "I think it is {x}, or maybe {y}.",
    "Hmm, let me think. It could be {x}.",
    "The answer might be {x}, but I am not sure.",
    "Well, {x} I guess.",
)
_JUNK_LINES = (
    "I hope this helps.",
    "Let me know if you need anything else.",
    "Have a nice day.",
    "That was easy.",
)
_REFUSALS = (
    "I don't know.",
    "I can't help with that.",
    "Sorry, I am not sure.",
    "That is a hard question.",
)
_EMPTYISH = ("", "...", "?", "hmm")

# failure mode -> weight
_CORRUPTION_MODES = (("wrong_value", 0.35), ("ramble", 0.2), ("junk", 0.2), ("refuse", 0.15), ("empty", 0.1))

CORRECT_PROB = 0.4  # share of correct answers among candidate responses
MAX_DOC_CHARS = 200  # pretraining documents stay at or under this length


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


# ------------------------------------------------------------------- corruptions


def _wrong_number(expected: int, rng: random.Random) -> int:
    if rng.random() < 0.5:
        return expected + rng.choice((-1, 1)) if expected > 0 else expected + 1
    hi = max(20, 2 * expected + 5)
    value = rng.randint(0, hi)
    return value if value != expected else value + 1


def _other_word(word: str, rng: random.Random) -> str:
    other = rng.choice(WORDS)
    while other == word:
        other = rng.choice(WORDS)
    return other


def _wrong_word(task: Task, word: str, rng: random.Random) -> str:
    answer = task.answer
    if task.kind == "reverse":
        options = [
            lambda: word,  # not reversed at all
            lambda: word[0] + word[1:][::-1],  # reversed only after the first letter
            lambda: word[: len(word) // 2][::-1] + word[len(word) // 2 :],  # first half reversed
            lambda: answer[1:2] + answer[:1] + answer[2:],  # first two letters swapped
            lambda: answer[:-1],  # a letter dropped
            lambda: answer.upper(),  # the wrong transform
        ]
    else:  # upper
        options = [
            lambda: word,  # lowercase instead of upper
            lambda: word.capitalize(),
            lambda: word[: len(word) // 2].upper() + word[len(word) // 2 :],  # half uppercase
            lambda: word[::-1].upper(),  # uppercased the reversal
            lambda: answer[:-1],  # a letter dropped
        ]
    options.append(lambda: _answer(task.kind, (_other_word(word, rng),)))  # another word's answer
    return rng.choice(options)()


def corrupt(task: Task, rng: random.Random) -> str:
    """A wrong or low-quality answer text for ``task`` (no leading space).

    Never equal to ``task.answer`` after stripping, so it always judges < 1.0.
    """
    modes, weights = zip(*_CORRUPTION_MODES)
    _, args = _parse(task.prompt)
    numeric = task.kind in NUMERIC_KINDS
    for _ in range(20):
        mode = rng.choices(modes, weights)[0]
        if numeric:
            wrong = str(_wrong_number(int(task.answer), rng))
        else:
            wrong = _wrong_word(task, args[0], rng)
        if mode == "wrong_value":
            text = wrong
        elif mode == "ramble":
            x = task.answer if rng.random() < 0.5 else wrong
            y = str(int(x) + 1) if numeric else args[0]
            text = rng.choice(_RAMBLES).format(x=x, y=y)
        elif mode == "junk":
            x = task.answer if rng.random() < 0.7 else wrong
            if rng.random() < 0.5:
                text = " ".join([x] * rng.randint(2, 4))  # repeated on one line
            else:
                extra = rng.choice(_JUNK_LINES + (x,))
                text = f"{x}\n{extra}"
        elif mode == "refuse":
            text = rng.choice(_REFUSALS)
        else:
            text = rng.choice(_EMPTYISH)
        if text.strip() != task.answer:
            return text
    return _REFUSALS[0]


# ------------------------------------------------------------------------- judge


def _clip(x: float) -> float:
    return round(min(1.0, max(0.0, x)), 6)


def score_response(task: Task, response: str) -> float:
    """Score ``response`` against ``task``'s expected answer (see the module docstring)."""
    text = response.strip()
    if not text:
        return 0.0
    first, _, rest = text.partition("\n")
    first = first.strip()
    expected = task.answer
    if first == expected:
        score = 1.0
    elif task.kind in NUMERIC_KINDS:
        m = re.search(r"-?\d+", first)
        if m is None:
            score = 0.0
        else:
            diff = abs(int(m.group()) - int(expected))
            score = 0.6 if diff == 0 else 0.3 * max(0.0, 1.0 - diff / 5)
    else:
        if expected in re.findall(r"[A-Za-z]+", first):
            score = 0.6
        else:
            cs = difflib.SequenceMatcher(None, first, expected).ratio()
            ci = difflib.SequenceMatcher(None, first.lower(), expected.lower()).ratio()
            score = 0.5 * (cs + ci) / 2
    if rest.strip():
        score -= 0.2
    if len(text) > 3 * len(expected) + 10:
        score -= 0.2
    return _clip(score)


def judge(prompt: str, response: str) -> float:
    """Ground-truth score in [0, 1] of ``response`` to a raw or formatted ``prompt``."""
    return score_response(parse_task(prompt), response)


def judge_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """:func:`judge` over parallel lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return [judge(p, r) for p, r in zip(prompts, responses)]


def ground_truth_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward callable for RL: the ground-truth judge over a batch."""
    return judge_batch(prompts, responses)


class GroundTruthReward:
    """Instantiable form of :func:`ground_truth_reward` (for ``_target_`` without ``_partial_``)."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return judge_batch(prompts, responses)


# ------------------------------------------------------------------------- world


class SyntheticWorld:
    """Deterministic generator of tasks, pretraining text, SFT pairs and preference pairs."""

    def __init__(self, seed: int = 0, kinds: Sequence[str] | None = None):
        self.seed = int(seed)
        self.kinds: tuple[str, ...] = KINDS if kinds is None else tuple(kinds)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown or no task kinds {list(self.kinds)!r}; choose from {KINDS}")
        self._by_split: dict[str, dict[str, list[Task]]] = {s: {} for s in _SPLIT_NAMES}
        for kind in self.kinds:
            for split in _SPLIT_NAMES:
                self._by_split[split][kind] = []
            for task in _enumerate_kind(kind):
                self._by_split[split_of(task.prompt)][kind].append(task)
            empty = [s for s in _SPLIT_NAMES if not self._by_split[s][kind]]
            if empty:  # cannot happen with the embedded world; guards edits to it
                raise RuntimeError(f"kind {kind!r} has no prompt in split(s) {empty}")

    def __repr__(self) -> str:
        return f"SyntheticWorld(seed={self.seed}, kinds={list(self.kinds)})"

    # ---------------------------------------------------------------- helpers

    def _rng(self, stream: str, *parts: object) -> random.Random:
        key = "/".join(str(p) for p in ("lmforge-synthetic", self.seed, stream, *parts))
        return random.Random(key)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in _SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose from {_SPLIT_NAMES}")

    def _draw(self, rng: random.Random, split: str) -> Task:
        kind = rng.choice(self.kinds)
        return rng.choice(self._by_split[split][kind])

    def _sample(self, n: int, split: str, stream: str, seed_offset: int) -> list[Task]:
        self._check_split(split)
        rng = self._rng(stream, split, seed_offset)
        return [self._draw(rng, split) for _ in range(n)]

    # ---------------------------------------------------------------- public

    def all_tasks(self, split: str = "test") -> list[Task]:
        """Every task of ``split`` (for this world's kinds), in a fixed order."""
        self._check_split(split)
        return [t for kind in self.kinds for t in self._by_split[split][kind]]

    def tasks(self, n: int, split: str = "train", seed_offset: int = 0) -> list[Task]:
        """``n`` tasks of ``split``: a uniformly drawn kind, then a uniform prompt of that kind."""
        return self._sample(n, split, "tasks", seed_offset)

    def sft_pairs(self, n: int, split: str = "train", seed_offset: int = 0) -> list[tuple[str, str]]:
        """``n`` (format_prompt(prompt), " " + answer) pairs with correct answers."""
        return [(format_prompt(t.prompt), " " + t.answer) for t in self._sample(n, split, "sft", seed_offset)]

    def prompts(self, n: int, split: str = "train", seed_offset: int = 0) -> list[str]:
        """``n`` formatted prompts of ``split`` (for RL rollouts and evaluation)."""
        return [format_prompt(t.prompt) for t in self._sample(n, split, "prompts", seed_offset)]

    def candidate_response(self, task: Task, rng: random.Random | int | None = None) -> str:
        """A response (with leading space) of random quality: correct w.p. 0.4, else a corruption."""
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        if rng.random() < CORRECT_PROB:
            return " " + task.answer
        return " " + corrupt(task, rng)

    def _prose(self, task: Task, rng: random.Random) -> str:
        _, args = _parse(task.prompt)
        a = args[0]
        b = args[1] if len(args) > 1 else ""
        d = min(args) if task.kind == "compare" else ""
        template = rng.choice(_PROSE[task.kind])
        sentence = template.format(a=a, b=b, w=a, c=task.answer, d=d)
        return sentence[0].upper() + sentence[1:]

    def pretrain_documents(
        self,
        n_docs: int,
        wrong_rate: float = 0.3,
        *,
        prose_rate: float = 0.1,
        seed_offset: int = 0,
    ) -> list[str]:
        """``n_docs`` short pretraining documents from the train split.

        A document is 1-4 dialogs ``format_prompt(p) + response + "\\n"``, each
        response wrong or low-quality (a corruption) with probability ``wrong_rate``;
        a share ``prose_rate`` of documents are instead 1-4 correct descriptive
        sentences, one per line. Documents stay within ``MAX_DOC_CHARS`` characters
        (a document's first item is always kept).
        """
        if not 0.0 <= wrong_rate <= 1.0 or not 0.0 <= prose_rate <= 1.0:
            raise ValueError(f"wrong_rate and prose_rate must be in [0, 1], got {wrong_rate}, {prose_rate}")
        rng = self._rng("pretrain", wrong_rate, prose_rate, seed_offset)
        docs = []
        for _ in range(n_docs):
            prose = rng.random() < prose_rate
            doc = ""
            for _ in range(rng.randint(1, 4)):
                task = self._draw(rng, "train")
                if prose:
                    item = self._prose(task, rng) + "\n"
                else:
                    bad = rng.random() < wrong_rate
                    response = " " + (corrupt(task, rng) if bad else task.answer)
                    item = format_prompt(task.prompt) + response + "\n"
                if doc and len(doc) + len(item) > MAX_DOC_CHARS:
                    break
                doc += item
            docs.append(doc)
        return docs

    def preference_pairs(
        self, n: int, split: str = "train", noise: float = 0.0, seed_offset: int = 0
    ) -> list[dict]:
        """``n`` preference records ``{prompt, chosen, rejected, chosen_score, rejected_score}``.

        For each task two distinct candidate responses are judged; ties are skipped.
        The simulated annotator prefers A with probability ``sigmoid((s_A - s_B) / noise)``
        (``noise = 0``: always the higher-scored one). Scores are the true judge scores.
        """
        self._check_split(split)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        rng = self._rng("preferences", split, noise, seed_offset)
        pairs: list[dict] = []
        attempts = 0
        while len(pairs) < n:
            attempts += 1
            if attempts > 100 * n + 100:
                raise RuntimeError("could not sample enough non-tied preference pairs")
            task = self._draw(rng, split)
            a = self.candidate_response(task, rng)
            b = self.candidate_response(task, rng)
            for _ in range(10):
                if b != a:
                    break
                b = self.candidate_response(task, rng)
            s_a, s_b = score_response(task, a), score_response(task, b)
            if s_a == s_b:
                continue
            if noise == 0:
                a_wins = s_a > s_b
            else:
                z = (s_a - s_b) / noise
                p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
                a_wins = rng.random() < p_a
            (chosen, cs), (rejected, rs) = ((a, s_a), (b, s_b)) if a_wins else ((b, s_b), (a, s_a))
            pairs.append(
                {
                    "prompt": format_prompt(task.prompt),
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": cs,
                    "rejected_score": rs,
                }
            )
        return pairs
