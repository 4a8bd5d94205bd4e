"""Wrong and low-quality answers to a synthetic-world task, in the failure modes that human
feedback fixes: the rejected side of preference pairs and the bad dialogs of pretraining text.

Corruptions (what human feedback fixes)
---------------------------------------
:func:`corrupt` produces a wrong or low-quality answer text in one of five
failure modes: ``wrong_value`` (off-by-one or random number; partial reversal,
the untouched word, lowercase/capitalized/half-uppercase, the wrong transform,
another word), ``ramble`` ("I think it is 19, or maybe 20."), ``junk`` (the
answer repeated on one line, or followed by extra lines), ``refuse``
("I don't know.") and ``empty`` ("", "...", "hmm"). A corruption never equals the
answer after stripping, so it always judges < 1.0 (see :mod:`lmforge.world.judge`).
"""

from __future__ import annotations

import functools
import random

from lmforge.world.splits import split_of
from lmforge.world.tasks import NUMERIC_KINDS, WORDS, Task, _answer, _make_task, _parse

__all__ = ["corrupt"]

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


# ------------------------------------------------------------------- corruptions


def _wrong_number(expected: int, rng: random.Random) -> int:
    if rng.random() < 0.5:
        return expected + rng.choice((-1, 1)) if expected > 0 else expected + 1
    hi = max(20, 2 * expected + 5)
    value = rng.randint(0, hi)
    return value if value != expected else value + 1


@functools.cache
def _words_in_split(kind: str, split: str) -> tuple[str, ...]:
    return tuple(w for w in WORDS if split_of(_make_task(kind, w).prompt) == split)


def _other_word(task: Task, word: str, rng: random.Random) -> str:
    # A word whose prompt of this kind is in the task's split: "another word's answer" to a
    # training prompt is then never a held-out answer (the reversal of a word reversed only in
    # test), so no training document holds one, not even as a wrong answer.
    words = _words_in_split(task.kind, split_of(task.prompt))
    if len(words) < 2:
        words = WORDS
    other = rng.choice(words)
    while other == word:
        other = rng.choice(words)
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
    options.append(lambda: _answer(task.kind, (_other_word(task, word, rng),)))  # another word's answer
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
