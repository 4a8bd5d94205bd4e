"""The split of every synthetic-world prompt: ``train``, ``val``, ``test`` or ``hard``.

Held-out prompts test skills, not unseen facts
----------------------------------------------
A held-out prompt must be answerable by a skill that pretraining and SFT teach. Holding out
prompts by a hash of the whole prompt string does not do that for the word kinds: the answer to
"Reverse the word: lemon" is "nomel", a string no training document contains, so a model
could only get it by reversing letters it has never reversed as a unit. So prompts are held out
by *combination* instead: a held-out prompt combines operands seen in training in a way
training never showed, and every part of its answer is something training taught:

* ``add``, ``mul``, ``compare``: an unordered operand pair, so neither order of a held-out pair
  is in training. Pairs with an *anchor* operand (0 or 20 for add, 0 for compare, 1 for mul)
  always train, so every held-out operand is seen in training with another partner, in the same
  position (``a + 0``, ``0 + b``). Every held-out answer is a training answer: add's
  ``0 + c`` and ``20 + (c - 20)``, compare's ``c or 0``; a mul product up to 40 is the answer
  to a training add, a larger one the answer to a training ``next`` (a product whose
  ``next`` is held out stays in training).
* ``sub``: an ordered pair; ``a - 0`` and ``20 - b`` always train, so ``a`` and ``b`` are seen
  in their positions and every difference is a training answer (``c - 0``).
* ``next``: only odd numbers up to 97 are held out, so both neighbours train: the operand ``a``
  is the answer to the training ``next`` of ``a - 1``, and the answer ``a + 1`` the operand of
  the training ``next`` of ``a + 1``. (An answer above 40 is in general the answer to no
  training task: only ``next`` itself and a few products reach it.)
* ``reverse``, ``upper``, ``length``: a word has at most one held-out kind, chosen by a hash of
  the word, so a held-out word is in the training prompts of the two other kinds. *Anchor
  words* never have one: for every letter the first word of ``WORDS`` that has it, and for every
  length the first word that long. So every letter of a held-out ``reverse`` or ``upper``
  answer is in a training answer of that kind, and every held-out ``length`` a training answer.

Which eligible combinations are held out: a kind's eligible combinations (words, for the word
kinds) in the order of a stable SHA-256 hash of each (never Python's salted ``hash()``), the
first ones to ``val`` until it holds a tenth of the kind's prompts, the next ones to ``test``
(words: to each kind's val and test in turn). So the split is the same in every process, and
independent of the world's seed: the held-out prompts stay held out whatever seed a stage uses.

``hard``: every prompt with operands outside the world's ranges (:func:`lmforge.world.tasks.in_world`),
such as the longer numbers of :func:`lmforge.world.tasks.enumerate_hard`. It is never in training,
validation nor the test split, and is evaluated only when asked for, reported apart.

Sizes (train / val / test / hard)::

    add       353 / 44 / 44 / 6,241       reverse  120 / 15 / 15 / 0
    sub       185 / 23 / 23 / 3,160       upper    120 / 15 / 15 / 0
    mul        63 /  9 /  9 /    63       length   120 / 15 / 15 / 0
    compare   336 / 42 / 42 / 6,162
    next       80 / 10 / 10 /   900       all    1,377 / 173 / 173 / 16,526

(mul: a tenth of 81 is 8; the last pair of two prompts to each split makes it 9.)

Pretraining documents (dialogs and prose), SFT pairs, RL prompts and preference pairs of
``train`` are drawn from ``train`` prompts only (:class:`lmforge.world.generator.SyntheticWorld`),
and a wrong answer in them is never a held-out answer: "another word's answer" to a training
prompt is that of another training word (:mod:`lmforge.world.corruptions`).
"""

from __future__ import annotations

import functools
import hashlib

from lmforge.world.tasks import COUNTING, SMALL, WORD_OPERAND_KINDS, WORDS, _parse, enumerate_kind, in_world

__all__ = ["SPLITS", "WORLD_SPLITS", "HELD_OUT_SPLITS", "split_of", "anchor_words", "held_out_kind"]

SPLITS: tuple[str, ...] = ("train", "val", "test", "hard")
WORLD_SPLITS: tuple[str, ...] = ("train", "val", "test")  # the world's ranges, ~80/10/10
HELD_OUT_SPLITS: tuple[str, ...] = ("val", "test", "hard")

HELD_OUT_SHARE = 0.1  # of each kind's prompts in val, and as many in test

_TOP = SMALL[-1]  # 20: the largest add, sub and compare operand


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (SHA-256: the same in every process)."""
    digest = hashlib.sha256(f"lmforge-split/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------- numeric kinds


def _next_combination(a: int) -> tuple | None:
    # Only odd numbers whose next neighbour is in the world: both neighbours (even) train.
    return None if a % 2 == 0 or a + 1 not in COUNTING else (a,)


def _product_is_taught(p: int) -> bool:
    """Whether ``p`` is the answer to a training task of another kind: a sum (the anchors
    0 + p and 20 + (p - 20) reach 40) or the ``next`` of ``p - 1`` where that trains."""
    return p <= 2 * _TOP or _held_out("next").get((p - 1,)) is None


def _combination(kind: str, args: tuple) -> tuple | None:
    """The combination a prompt of a numeric kind would withhold if held out, or None where the
    prompt must train (an anchor, or a pair whose answer only it teaches)."""
    if kind == "next":
        return _next_combination(args[0])
    a, b = args
    lo, hi = sorted(args)
    if kind == "add":  # a + 0, 0 + b show each operand; 0 + c and 20 + d every sum
        return None if lo == 0 or hi == _TOP else (lo, hi)
    if kind == "sub":  # a - 0 shows a and every difference, 20 - b shows b
        return None if b == 0 or a == _TOP else (a, b)
    if kind == "compare":  # "x or 0" and "0 or x" show every operand and every answer
        return None if lo == 0 else (lo, hi)
    if kind == "mul":  # a * 1 and 1 * b show each operand
        return None if lo == 1 or not _product_is_taught(lo * hi) else (lo, hi)
    raise ValueError(f"unknown numeric task kind {kind!r}")


def _fill(ranked: list, sizes: dict, target: int, slots: list) -> dict:
    """Walk ``ranked`` keys, giving each to the first slot with fewer than ``target`` prompts
    (``sizes[key]`` prompts each) until every slot is full; returns {key: slot}."""
    filled = dict.fromkeys(slots, 0)
    out = {}
    for key in ranked:
        open_slots = [s for s in slots if filled[s] < target]
        if not open_slots:
            break
        out[key] = open_slots[0]
        filled[open_slots[0]] += sizes[key]
    return out


@functools.cache
def _held_out(kind: str) -> dict[tuple, str]:
    """{combination: "val" or "test"} of a numeric kind: its eligible combinations in the order
    of their hash, the first a tenth of the kind's prompts to val, the next to test."""
    tasks = enumerate_kind(kind)
    sizes: dict[tuple, int] = {}
    for task in tasks:
        key = _combination(kind, _parse(task.prompt)[1])
        if key is not None:  # an unordered pair is one combination of two prompts
            sizes[key] = sizes.get(key, 0) + 1
    ranked = sorted(sizes, key=lambda k: _fraction(f"{kind}/{k}"))
    return _fill(ranked, sizes, round(HELD_OUT_SHARE * len(tasks)), ["val", "test"])


# ------------------------------------------------------------------------------- word kinds


@functools.cache
def anchor_words() -> frozenset[str]:
    """Words that train in every kind: for each letter the first word of ``WORDS`` that has it,
    for each length the first word that long (so every held-out answer's parts are taught)."""
    letters = sorted(set("".join(WORDS)))
    firsts = [next(w for w in WORDS if ch in w) for ch in letters]
    firsts += [next(w for w in WORDS if len(w) == n) for n in sorted({len(w) for w in WORDS})]
    return frozenset(firsts)


@functools.cache
def _word_table() -> dict[str, tuple[str, str]]:
    """{word: (kind, split)}: the other words in the order of their hash, a tenth of the words to
    each (kind, val) and (kind, test) in turn, so a word is held out in at most one kind."""
    ranked = sorted((w for w in WORDS if w not in anchor_words()), key=lambda w: _fraction(f"word/{w}"))
    slots = [(kind, split) for kind in WORD_OPERAND_KINDS for split in ("val", "test")]
    return _fill(ranked, dict.fromkeys(ranked, 1), round(HELD_OUT_SHARE * len(WORDS)), slots)


def held_out_kind(word: str) -> tuple[str, str] | None:
    """(kind, split) of the one word kind in which ``word`` is held out, or None."""
    return _word_table().get(word)


# -------------------------------------------------------------------------------- the split


@functools.lru_cache(maxsize=1 << 16)
def split_of(prompt: str) -> str:
    """The split ("train", "val", "test" or "hard") of a raw or formatted task prompt.

    A prompt outside the world's ranges is "hard"; one that is not a task raises ValueError.
    """
    task, args = _parse(prompt)
    if not in_world(task.kind, args):
        return "hard"
    if task.kind in WORD_OPERAND_KINDS:
        held = held_out_kind(args[0])
        return held[1] if held is not None and held[0] == task.kind else "train"
    return _held_out(task.kind).get(_combination(task.kind, args), "train")
