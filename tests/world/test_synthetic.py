"""Tests of the embedded synthetic world and its ground-truth judge (pure Python, fast)."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from lmforge.world.corruptions import corrupt
from lmforge.world.generator import SyntheticWorld
from lmforge.world.judge import GroundTruthReward, ground_truth_reward, judge, judge_batch, score_response
from lmforge.world.splits import split_of
from lmforge.world.tasks import (
    KINDS,
    PROMPT_TEMPLATE,
    WORDS,
    Task,
    format_prompt,
    parse_dialogs,
    parse_task,
)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0)


def _all_prompts() -> list[str]:
    w = SyntheticWorld()
    return [t.prompt for split in ("train", "val", "test") for t in w.all_tasks(split)]


# ------------------------------------------------------------------ determinism


def _outputs(w: SyntheticWorld) -> tuple:
    return (
        w.tasks(50),
        w.tasks(20, "test"),
        w.sft_pairs(30),
        w.prompts(30, "val"),
        w.pretrain_documents(30),
        w.preference_pairs(30, noise=0.3),
    )


def test_same_seed_same_outputs_different_seed_different():
    assert _outputs(SyntheticWorld(seed=3)) == _outputs(SyntheticWorld(seed=3))
    a, b = _outputs(SyntheticWorld(seed=3)), _outputs(SyntheticWorld(seed=4))
    for x, y in zip(a, b):
        assert x != y
    w = SyntheticWorld(seed=3)
    assert w.tasks(50, seed_offset=1) != w.tasks(50)
    assert w.preference_pairs(30, seed_offset=1) != w.preference_pairs(30)


def test_sampling_is_prefix_stable(world):
    assert world.tasks(40)[:10] == world.tasks(10)
    assert world.sft_pairs(40)[:10] == world.sft_pairs(10)


def test_world_size_and_word_list():
    assert len(WORDS) == len(set(WORDS)) >= 140
    assert all(3 <= len(w) <= 7 and w.isalpha() and w.islower() and w != w[::-1] for w in WORDS)
    prompts = _all_prompts()
    assert len(prompts) == len(set(prompts)) > 1500


# ------------------------------------------------------------------------ splits


def test_splits_are_disjoint_and_roughly_80_10_10():
    w = SyntheticWorld()
    sets = {s: {t.prompt for t in w.all_tasks(s)} for s in ("train", "val", "test", "hard")}
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)
    total = sum(len(sets[s]) for s in ("train", "val", "test"))
    assert total == 1723
    assert abs(len(sets["train"]) / total - 0.8) < 0.01
    assert abs(len(sets["val"]) / total - 0.1) < 0.01
    assert abs(len(sets["test"]) / total - 0.1) < 0.01
    for split, prompts in sets.items():
        assert all(split_of(p) == split for p in prompts)
    # formatted prompts land in the same split
    assert all(split_of(format_prompt(p)) == split_of(p) for p in list(sets["test"])[:50])
    # every kind has prompts in train, val and test (tests/world/test_splits.py: per-kind sizes)
    for kind in KINDS:
        single = SyntheticWorld(kinds=[kind])
        for split in ("train", "val", "test"):
            assert single.all_tasks(split)


def test_test_split_never_yields_a_train_prompt(world):
    train = {t.prompt for t in world.all_tasks("train")}
    test_tasks = world.tasks(3000, split="test")
    assert all(split_of(t.prompt) == "test" and t.prompt not in train for t in test_tasks)
    assert {t.kind for t in test_tasks} == set(KINDS)
    assert all(split_of(p) == "test" for p in world.prompts(500, "test"))
    assert all(split_of(p["prompt"]) == "test" for p in world.preference_pairs(200, split="test"))
    assert all(split_of(p) == "train" for p, _ in world.sft_pairs(500))


# ------------------------------------------------------------------------- judge

# (prompt, response, expected score) -- computed by hand from the rules:
# exact 1.0; numeric: first number right 0.6 else 0.3*max(0, 1-|diff|/5);
# words: whole word present 0.6 else 0.5*mean(case-sensitive, case-insensitive
# SequenceMatcher ratio); later lines -0.2; longer than 3*len(expected)+10 -0.2.
JUDGE_CASES = [
    ("What is 7 + 12?", "19", 1.0),
    ("What is 7 + 12?", " 19\n", 1.0),  # surrounding whitespace is ignored
    ("What is 7 + 12?", "19\n19", 0.8),  # extra line
    ("What is 7 + 12?", "19\nI hope this helps.", 0.6),  # extra line and too long (21 > 16)
    ("What is 7 + 12?", "19 19", 0.6),  # right number, extra words
    ("What is 7 + 12?", "I think it is 19, or maybe 20.", 0.4),  # rambling: 0.6 - 0.2 (length)
    ("What is 7 + 12?", "20", 0.24),  # off by one: 0.3 * (1 - 1/5)
    ("What is 7 + 12?", "18", 0.24),
    ("What is 7 + 12?", "22", 0.12),  # 0.3 * (1 - 3/5)
    ("What is 7 + 12?", "24", 0.0),  # |diff| >= 5
    ("What is 7 + 12?", "nineteen", 0.0),  # no number
    ("What is 7 + 12?", "I don't know.", 0.0),
    ("What is 7 + 12?", "", 0.0),
    ("What is 7 + 12?", "   ", 0.0),
    ("What is 15 - 6?", "9", 1.0),
    ("What is 3 * 7?", "20", 0.24),
    ("Which is larger, 14 or 9?", "14", 1.0),
    ("Which is larger, 14 or 9?", "9", 0.0),  # the smaller one: |diff| = 5
    ("How many letters are in lemon?", "5", 1.0),
    ("How many letters are in lemon?", "6", 0.24),
    ("What comes after 17?", "18", 1.0),
    ("What comes after 17?", "17", 0.24),
    ("Reverse the word: lemon", "nomel", 1.0),
    ("Reverse the word: lemon", "nomel.", 0.6),  # exact word, extra characters
    ("Reverse the word: lemon", "It is nomel", 0.6),
    ("Reverse the word: lemon", "nomel\nnomel", 0.8),
    ("Reverse the word: lemon", "nomel nomel nomel nomel nomel", 0.4),  # 29 > 25 chars
    ("Reverse the word: lemon", "nomxl", 0.4),  # ratio 2*4/10 = 0.8 -> 0.5 * 0.8
    ("Reverse the word: lemon", "NOMEL", 0.25),  # ratios 0 (case-sensitive), 1 -> 0.5 * 0.5
    ("Reverse the word: lemon", "lemon", 0.1),  # not reversed: one matching letter, ratio 0.2
    ("Uppercase: lemon", "LEMON", 1.0),
    ("Uppercase: lemon", "lemon", 0.25),  # lowercase instead of upper
    ("Uppercase: lemon", "Lemon", 0.3),  # ratios 0.2 and 1.0 -> 0.5 * 0.6
    ("User: What is 7 + 12?\nAssistant:", " 19", 1.0),  # formatted prompt accepted
    ("User: What is 7 + 12?\nAssistant:", " 20", 0.24),
    ("User: What is 1 + 1?\nAssistant: 2\nUser: Uppercase: lemon\nAssistant:", " LEMON", 1.0),
]


@pytest.mark.parametrize("prompt,response,expected", JUDGE_CASES)
def test_judge_table(prompt, response, expected):
    assert judge(prompt, response) == pytest.approx(expected, abs=1e-6)


def test_judge_rejects_unparseable_prompt():
    with pytest.raises(ValueError, match="Tell me a joke"):
        judge("Tell me a joke.", "no")
    with pytest.raises(ValueError):
        parse_task("User: What is seven plus two?\nAssistant:")


def test_parse_task_every_kind(world):
    assert parse_task("What is 7 + 12?") == Task("add", "What is 7 + 12?", "19")
    assert parse_task(format_prompt("Reverse the word: lemon")) == Task("reverse", "Reverse the word: lemon", "nomel")
    for split in ("train", "val", "test"):
        for task in world.all_tasks(split):
            assert parse_task(task.prompt) == task
            assert parse_task(format_prompt(task.prompt)) == task
    assert format_prompt("X") == PROMPT_TEMPLATE.format(prompt="X") == "User: X\nAssistant:"


def test_batch_and_reward_callables():
    prompts = ["What is 7 + 12?", format_prompt("Uppercase: lemon")]
    responses = [" 19", " lemon"]
    assert judge_batch(prompts, responses) == [1.0, 0.25]
    assert ground_truth_reward(prompts, responses) == [1.0, 0.25]
    assert GroundTruthReward()(prompts, responses) == [1.0, 0.25]
    with pytest.raises(ValueError):
        judge_batch(prompts, responses[:1])


def test_every_kind_correct_scores_one_and_corruptions_less():
    rng = random.Random(0)
    for kind in KINDS:
        w = SyntheticWorld(seed=1, kinds=[kind])
        tasks = w.tasks(200)
        assert {t.kind for t in tasks} == {kind}
        assert all(judge(t.prompt, " " + t.answer) == 1.0 for t in tasks)
        corrupted = [score_response(t, corrupt(t, rng)) for t in tasks for _ in range(3)]
        assert max(corrupted) < 1.0, kind
        assert min(corrupted) >= 0.0
        assert 0.05 < statistics.mean(corrupted) < 0.5, kind  # dense: partial credit exists
        assert len(set(corrupted)) > 4, kind


def test_corruptions_never_equal_the_answer_on_tricky_words():
    # a reversal starting with a double letter ("shell" -> "llehs") is unchanged by
    # swapping its first two letters, one of the partial-reversal corruptions
    tricky = [w for w in WORDS if w[-1] == w[-2]]
    assert tricky
    rng = random.Random(0)
    for word in tricky:
        for prompt in (f"Reverse the word: {word}", f"Uppercase: {word}"):
            task = parse_task(prompt)
            assert all(corrupt(task, rng).strip() != task.answer for _ in range(600))


def test_candidate_response_quality(world):
    rng = random.Random(0)
    tasks = world.tasks(3000)
    scores = [judge(t.prompt, world.candidate_response(t, rng)) for t in tasks]
    assert abs(sum(s == 1.0 for s in scores) / len(scores) - 0.4) < 0.04
    assert 0.45 < statistics.mean(scores) < 0.65
    # an int seed is accepted and deterministic
    t = tasks[0]
    assert world.candidate_response(t, 7) == world.candidate_response(t, 7)


# ------------------------------------------------------------------ generators


@pytest.mark.parametrize("wrong_rate", [0.0, 0.3, 0.7])
def test_pretrain_documents_wrong_share(world, wrong_rate):
    docs = world.pretrain_documents(1500, wrong_rate=wrong_rate)
    assert len(docs) == 1500
    assert all(0 < len(d) <= 200 for d in docs)
    dialogs = [pair for d in docs for pair in parse_dialogs(d)]
    assert len(dialogs) > 2500
    assert all(split_of(p) == "train" for p, _ in dialogs)
    wrong = sum(judge(p, r) < 1.0 for p, r in dialogs) / len(dialogs)
    assert abs(wrong - wrong_rate) < 0.03
    # ~10% prose documents, and they state correct facts (no dialog inside)
    prose = [d for d in docs if not parse_dialogs(d)]
    assert 0.06 < len(prose) / len(docs) < 0.14
    assert all("User:" not in d and "Assistant:" not in d for d in prose)
    # a dialog in a document is exactly an SFT-style prompt + response + newline
    d = next(d for d in docs if parse_dialogs(d))
    p, r = parse_dialogs(d)[0]
    assert d.startswith(format_prompt(p) + r + "\n")


def test_sft_pairs_are_correct_and_formatted(world):
    pairs = world.sft_pairs(1000)
    for prompt_text, response_text in pairs:
        assert prompt_text.startswith("User: ") and prompt_text.endswith("\nAssistant:")
        assert response_text.startswith(" ") and response_text == " " + response_text.strip()
        assert judge(prompt_text, response_text) == 1.0
    assert len({p for p, _ in pairs}) > 300  # varied


def _agreement(pairs: list[dict]) -> float:
    return sum(p["chosen_score"] > p["rejected_score"] for p in pairs) / len(pairs)


def test_preference_pairs_noise_free(world):
    pairs = world.preference_pairs(1000, noise=0.0)
    assert len(pairs) == 1000
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert p["chosen"] != p["rejected"]
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen_score"] == judge(p["prompt"], p["chosen"])
        assert p["rejected_score"] == judge(p["prompt"], p["rejected"])
        assert p["prompt"].endswith("\nAssistant:")


def test_preference_pairs_noise_lowers_agreement(world):
    moderate = _agreement(world.preference_pairs(1200, noise=0.2))
    large = _agreement(world.preference_pairs(1200, noise=1.0))
    huge = _agreement(world.preference_pairs(2000, noise=100.0))
    assert 0.8 < moderate < 0.98
    assert 0.55 < large < moderate
    assert abs(huge - 0.5) < 0.05  # measured 0.531; ~0.505 +- 0.014 over seed offsets
    with pytest.raises(ValueError):
        world.preference_pairs(1, noise=-1.0)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SyntheticWorld(kinds=["divide"])
    with pytest.raises(ValueError):
        SyntheticWorld(kinds=[])
    with pytest.raises(ValueError):
        SyntheticWorld().tasks(3, split="dev")
    with pytest.raises(ValueError):
        SyntheticWorld().pretrain_documents(3, wrong_rate=1.5)
