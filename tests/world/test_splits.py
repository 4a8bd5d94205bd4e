"""The synthetic world's splits (lmforge.world.splits) over the whole enumerated world: held-out
prompts are new combinations of what training shows, every part of a held-out answer is taught,
the hard split's numbers are longer than any training number, nothing held out reaches a
training document, and the split is the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import lmforge
from lmforge.world.generator import _PROSE, SyntheticWorld, held_out_prompts
from lmforge.world.splits import HELD_OUT_SPLITS, anchor_words, held_out_kind, split_of
from lmforge.world.tasks import KINDS, WORD_OPERAND_KINDS, WORDS, Task, _parse, parse_dialogs

NUMERIC = ("add", "sub", "mul", "compare", "next")
SYMMETRIC = ("add", "mul", "compare")  # held out as unordered pairs

# kind: (train, val, test, hard), as the lmforge.world.splits docstring states
SIZES = {
    "add": (353, 44, 44, 6241),
    "sub": (185, 23, 23, 3160),
    "mul": (63, 9, 9, 63),
    "compare": (336, 42, 42, 6162),
    "reverse": (120, 15, 15, 0),
    "upper": (120, 15, 15, 0),
    "length": (120, 15, 15, 0),
    "next": (80, 10, 10, 900),
}


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def by_split(world) -> dict[str, list[Task]]:
    return {s: world.all_tasks(s) for s in ("train", "val", "test", "hard")}


def args_of(task: Task) -> tuple:
    return _parse(task.prompt)[1]


def combination(task: Task) -> tuple:
    """(kind, operands); a symmetric kind's operands unordered, so 3 + 7 and 7 + 3 are one."""
    args = args_of(task)
    return (task.kind, tuple(sorted(args)) if task.kind in SYMMETRIC else args)


def numbers_in(text: str) -> list[int]:
    return [int(x) for x in "".join(c if c.isdigit() else " " for c in text).split()]


# ------------------------------------------------------------------------------------ sizes


def test_split_sizes_per_kind(by_split):
    for kind, sizes in SIZES.items():
        got = tuple(sum(t.kind == kind for t in by_split[s]) for s in ("train", "val", "test", "hard"))
        assert got == sizes, kind
        train, val, test, _ = sizes
        total = train + val + test
        assert abs(val / total - 0.1) < 0.015 and abs(test / total - 0.1) < 0.015, kind
    assert [len(by_split[s]) for s in ("train", "val", "test", "hard")] == [1377, 173, 173, 16526]


def test_split_of_decides_every_prompt(world, by_split):
    for split, tasks in by_split.items():
        assert {split_of(t.prompt) for t in tasks} == {split}
    # a prompt outside the world's ranges is hard whether the world lists it or not
    assert split_of("What is 150 + 3?") == split_of("What comes after 1000?") == "hard"
    assert split_of("Reverse the word: xylophone") == "hard"
    with pytest.raises(ValueError):
        split_of("Tell me a joke.")
    # every method that takes a split takes hard, which has numeric kinds only
    assert {t.kind for t in world.tasks(500, "hard")} == set(NUMERIC)
    assert all(split_of(p) == "hard" for p in world.prompts(50, "hard"))
    assert all(split_of(p["prompt"]) == "hard" for p in world.preference_pairs(50, "hard"))
    assert {split_of(p) for p in held_out_prompts(0, 40, "hard")} == {"hard"}
    assert held_out_prompts(0, 40, "hard") == held_out_prompts(0, 40, "hard")
    assert SyntheticWorld(kinds=["reverse"]).all_tasks("hard") == []
    with pytest.raises(ValueError, match="no prompt"):
        SyntheticWorld(kinds=["reverse"]).tasks(3, "hard")


# ------------------------------------------------------------------ held out = new combinations


def test_no_held_out_combination_is_in_training(by_split):
    train = {combination(t) for t in by_split["train"]}
    for split in HELD_OUT_SPLITS:
        assert not train & {combination(t) for t in by_split[split]}, split
    # nor a val combination in test
    assert not {combination(t) for t in by_split["val"]} & {combination(t) for t in by_split["test"]}


def test_held_out_operands_are_trained_with_other_partners(by_split):
    train = [t for t in by_split["train"] if t.kind in ("add", "sub", "mul", "compare")]
    for task in by_split["val"] + by_split["test"]:
        if task.kind not in ("add", "sub", "mul", "compare"):
            continue
        a, b = args_of(task)
        same_kind = [args_of(t) for t in train if t.kind == task.kind]
        # each operand, in its own position, with a partner other than the held-out one
        assert any(x == a and y != b for x, y in same_kind), task
        assert any(y == b and x != a for x, y in same_kind), task


def test_held_out_answers_are_taught(by_split):
    train = by_split["train"]
    answers = {kind: {t.answer for t in train if t.kind == kind} for kind in KINDS}
    any_answer = set().union(*answers.values())
    next_operands = {args_of(t)[0] for t in train if t.kind == "next"}
    for task in by_split["val"] + by_split["test"]:
        if task.kind in ("add", "sub", "compare", "length"):
            assert task.answer in answers[task.kind], task
        elif task.kind == "mul":
            assert task.answer in any_answer, task  # a sum up to 40, else the answer to a next
        elif task.kind == "next":
            # the operand is the answer to the next of a - 1; the answer the operand of the next
            # of a + 1 (above 40 only next and a few products answer, so it is not always an answer)
            a = args_of(task)[0]
            assert str(a) in answers["next"] and a + 1 in next_operands, task


def test_held_out_words_are_seen_and_their_letters_taught(by_split):
    train = by_split["train"]
    trained_kinds = {w: set() for w in WORDS}
    for t in train:
        if t.kind in WORD_OPERAND_KINDS:
            trained_kinds[args_of(t)[0]].add(t.kind)
    letters = {kind: set("".join(t.answer for t in train if t.kind == kind)) for kind in ("reverse", "upper")}
    held = Counter()
    for task in by_split["val"] + by_split["test"]:
        if task.kind not in WORD_OPERAND_KINDS:
            continue
        word = args_of(task)[0]
        held[word] += 1
        # seen in the training prompts of both other word kinds, never with this one
        assert trained_kinds[word] == set(WORD_OPERAND_KINDS) - {task.kind}, task
        assert held_out_kind(word) == (task.kind, split_of(task.prompt))
        if task.kind in letters:
            assert set(task.answer) <= letters[task.kind], task
    assert max(held.values()) == 1  # a word is held out in one kind at most
    assert not set(held) & anchor_words()
    assert all(c.islower() for c in letters["reverse"]) and all(c.isupper() for c in letters["upper"])


def test_hard_numbers_are_longer_than_any_training_number(by_split):
    largest = Counter()
    for split in ("train", "val", "test"):
        for t in by_split[split]:
            if t.kind in NUMERIC:
                largest[t.kind] = max(largest[t.kind], *args_of(t))
    assert dict(largest) == {"add": 20, "sub": 20, "compare": 20, "mul": 9, "next": 99}
    for t in by_split["hard"]:
        assert max(args_of(t)) > largest[t.kind], t
        if t.kind in ("add", "sub", "compare"):
            assert min(args_of(t)) > largest[t.kind], t  # both operands two-digit


# ------------------------------------------------------------------------ training documents


def test_nothing_held_out_reaches_a_training_document(world, by_split):
    held = [t for s in HELD_OUT_SPLITS for t in by_split[s]]
    held_prompts = {t.prompt for t in held}
    # held-out answers that are facts of their own (a word's reversal or capitals), unlike numbers
    held_words = {t.answer for t in held if t.kind in ("reverse", "upper")}
    train_sentences = {sentence(t, template) for t in by_split["train"] for template in _PROSE[t.kind]}
    held_sentences = {sentence(t, template) for t in held for template in _PROSE[t.kind]}
    docs = world.pretrain_documents(4000, prose_rate=0.3)
    dialogs = [pair for d in docs for pair in parse_dialogs(d)]
    assert len(dialogs) > 5000
    for prompt, response in dialogs:
        assert split_of(prompt) == "train" and prompt not in held_prompts
        assert not set(response.split()) & held_words, (prompt, response)
    prose = [line for d in docs if not parse_dialogs(d) for line in d.splitlines()]
    assert len(prose) > 1500
    assert set(prose) <= train_sentences  # every prose line states a training task
    assert not set(prose) & held_sentences
    assert not {w for line in prose for w in line.rstrip(".").split()} & held_words
    # SFT pairs, RL prompts and preference pairs of train: training prompts only
    assert all(split_of(p) == "train" for p, _ in world.sft_pairs(2000))
    assert all(split_of(p) == "train" for p in world.prompts(2000))
    pairs = world.preference_pairs(2000)
    assert all(split_of(p["prompt"]) == "train" for p in pairs)
    assert not {w for p in pairs for r in (p["chosen"], p["rejected"]) for w in r.split()} & held_words


def sentence(task: Task, template: str) -> str:
    """A prose line as SyntheticWorld._prose writes it with ``template``."""
    args = args_of(task)
    b = args[1] if len(args) > 1 else ""
    d = min(args) if task.kind == "compare" else ""
    text = template.format(a=args[0], b=b, w=args[0], c=task.answer, d=d)
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------ determinism

# The split of every world prompt and a sample of the hard ones, as JSON.
_SPLIT_TABLE = """
import json
from lmforge.world.generator import SyntheticWorld
from lmforge.world.splits import split_of
from lmforge.world.tasks import KINDS, enumerate_kind
table = {t.prompt: split_of(t.prompt) for kind in KINDS for t in enumerate_kind(kind)}
table["hard sample"] = [t.prompt for t in SyntheticWorld(3).all_tasks("hard")][::97]
print(json.dumps(table))
"""


def test_split_is_the_same_in_another_process(capsys):
    exec(_SPLIT_TABLE, {})
    here = json.loads(capsys.readouterr().out)
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", _SPLIT_TABLE], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here
    hard = here.pop("hard sample")
    assert Counter(here.values()) == {"train": 1377, "val": 173, "test": 173} and len(hard) == 171
