"""The synthetic world: :class:`SyntheticWorld`, the deterministic sampler of tasks, pretraining
documents, SFT pairs, RL prompts and preference pairs (with a simulated annotator).

A deterministic, procedurally generated world of short instruction tasks with
checkable answers. It needs no file and no network, and it is sized so that
every stage (pretraining -> SFT -> reward modeling -> PPO) shows a measurable
effect with a ~10M-parameter model on a small CPU in minutes.

Task kinds and the dialog format are in :mod:`lmforge.world.tasks`, the split of every prompt
(train, val, test, and the harder ``hard``) in :mod:`lmforge.world.splits`, wrong answers in
:mod:`lmforge.world.corruptions`, the ground-truth judge in :mod:`lmforge.world.judge`.

Sampling
--------
Improvement over "draw until one falls in the split": since the prompt space is
small and finite, the world enumerates each kind's prompts per split up front
and samples a task as *kind uniformly, then a prompt of that kind uniformly
within the split*. That is the same distribution as rejection sampling with
uniform kinds, costs O(1) per draw, and makes ``tasks(n)[:k] == tasks(k)``
(prefix-stable) for the same arguments. :meth:`SyntheticWorld.all_tasks` lists
a whole split (e.g. the 173 test prompts for a full held-out evaluation). The ``hard`` split
(16,526 prompts with longer numbers) is enumerated only when a method first asks for it, so
worlds that never use it pay nothing for it.

Determinism
-----------
Every sampling method builds its own ``random.Random`` from a string naming the
world's seed, the method (stream), the split and ``seed_offset``; string seeds
go through SHA-512, so the results are identical across processes and Python
runs whatever ``PYTHONHASHSEED`` is. Different methods use different streams.

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

import math
import random
from typing import Sequence

from lmforge.world.corruptions import corrupt
from lmforge.world.judge import score_response
from lmforge.world.splits import SPLITS, WORLD_SPLITS, split_of
from lmforge.world.tasks import KINDS, Task, _parse, enumerate_hard, enumerate_kind, format_prompt

__all__ = ["SyntheticWorld", "held_out_prompts"]

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

CORRECT_PROB = 0.4  # share of correct answers among candidate responses
MAX_DOC_CHARS = 200  # pretraining documents stay at or under this length


# ------------------------------------------------------------------------- world


class SyntheticWorld:
    """Deterministic generator of tasks, pretraining text, SFT pairs and preference pairs."""

    def __init__(self, seed: int = 0, kinds: Sequence[str] | None = None):
        self.seed = int(seed)
        self.kinds: tuple[str, ...] = KINDS if kinds is None else tuple(kinds)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown or no task kinds {list(self.kinds)!r}; choose from {KINDS}")
        self._by_split: dict[str, dict[str, list[Task]]] = {s: {} for s in WORLD_SPLITS}
        for kind in self.kinds:
            for split in WORLD_SPLITS:
                self._by_split[split][kind] = []
            for task in enumerate_kind(kind):
                self._by_split[split_of(task.prompt)][kind].append(task)
            empty = [s for s in WORLD_SPLITS if not self._by_split[s][kind]]
            if empty:  # cannot happen with the embedded world; guards edits to it
                raise RuntimeError(f"kind {kind!r} has no prompt in split(s) {empty}")
        # The kinds a split draws from, uniformly: all of them, except in hard (no word kinds).
        self._drawn_kinds: dict[str, tuple[str, ...]] = dict.fromkeys(WORLD_SPLITS, self.kinds)

    def __repr__(self) -> str:
        return f"SyntheticWorld(seed={self.seed}, kinds={list(self.kinds)})"

    # ---------------------------------------------------------------- helpers

    def _rng(self, stream: str, *parts: object) -> random.Random:
        key = "/".join(str(p) for p in ("lmforge-synthetic", self.seed, stream, *parts))
        return random.Random(key)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        if split not in self._by_split:  # hard: enumerated on first use
            by_kind = {kind: [t for t in enumerate_hard(kind) if split_of(t.prompt) == split] for kind in self.kinds}
            self._by_split[split] = by_kind
            self._drawn_kinds[split] = tuple(k for k in self.kinds if by_kind[k])

    def _draw(self, rng: random.Random, split: str) -> Task:
        kinds = self._drawn_kinds[split]
        if not kinds:
            raise ValueError(f"split {split!r} has no prompt of the kinds {list(self.kinds)}")
        return rng.choice(self._by_split[split][rng.choice(kinds)])

    def _sample(self, n: int, split: str, stream: str, seed_offset: int) -> list[Task]:
        self._check_split(split)
        rng = self._rng(stream, split, seed_offset)
        return [self._draw(rng, split) for _ in range(n)]

    # ---------------------------------------------------------------- public

    def all_tasks(self, split: str = "test") -> list[Task]:
        """Every task of ``split`` (for this world's kinds), in a fixed order; ``hard`` has
        numeric kinds only."""
        self._check_split(split)
        return [t for kind in self.kinds for t in self._by_split[split][kind]]

    def tasks(self, n: int, split: str = "train", seed_offset: int = 0) -> list[Task]:
        """``n`` tasks of ``split``: a uniformly drawn kind, then a uniform prompt of that kind
        (in ``hard``, a kind among those it has: the numeric ones)."""
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

    def preference_pairs(self, n: int, split: str = "train", noise: float = 0.0, seed_offset: int = 0) -> list[dict]:
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
            pairs.append(_labelled(task, (a, s_a), (b, s_b), noise, rng))
        return pairs

    def rank_samples(self, task: Task, responses: Sequence[str], noise: float, rng: random.Random) -> list[dict]:
        """The simulated annotator's verdicts on a policy's own samples for ``task`` (InstructGPT's
        comparisons of model outputs): every pair of distinct responses that the judge does not tie,
        labelled as :meth:`preference_pairs` labels its pairs. Same record format."""
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        distinct = list(dict.fromkeys(responses))
        scored = [(r, score_response(task, r)) for r in distinct]
        return [
            _labelled(task, a, b, noise, rng) for i, a in enumerate(scored) for b in scored[i + 1 :] if a[1] != b[1]
        ]


def annotator_prefers_a(s_a: float, s_b: float, noise: float, rng: random.Random) -> bool:
    """The Bradley-Terry annotator: A w.p. sigmoid((s_A - s_B) / noise); noise 0 = the judge's order."""
    if noise == 0:
        return s_a > s_b
    z = (s_a - s_b) / noise
    p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return rng.random() < p_a


def _labelled(task: Task, a: tuple[str, float], b: tuple[str, float], noise: float, rng: random.Random) -> dict:
    (chosen, cs), (rejected, rs) = (a, b) if annotator_prefers_a(a[1], b[1], noise, rng) else (b, a)
    return {
        "prompt": format_prompt(task.prompt),
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": cs,
        "rejected_score": rs,
    }


def held_out_prompts(seed: int, n: int, split: str = "test") -> list[str]:
    """`n` distinct raw task prompts of the world's `split` (all of them if n is larger), a fixed,
    kind-mixed subset: the same for every stage and run with the same seed. `split="hard"` gives
    the harder split's longer numbers (numeric kinds only), reported apart from `test`."""
    prompts = [t.prompt for t in SyntheticWorld(seed).all_tasks(split)]
    random.Random(f"lmforge-eval/{seed}/{split}").shuffle(prompts)
    return prompts[: max(0, n)]
