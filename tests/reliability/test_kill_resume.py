"""A run killed with SIGKILL at a random step, or preempted with SIGTERM, and resumed with
resume=auto continues exactly as if it had never stopped: the same loss at every step and the
same final weights and optimizer state, bit for bit (CPU, one process).

Two train.py victims run side by side (one gets SIGKILL, one SIGTERM at a random step) and then
resume side by side while the uninterrupted reference runs in this process. Dropout is on, so
the loss curve also depends on the RNG state coming back with the checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import signal

import pytest
import torch
from _reliability import (
    finish,
    launch,
    losses,
    metrics_path,
    output_of,
    read_rows,
    signal_at_steps,
    tiny_cfg,
)

from lmforge.training.checkpoint import load_checkpoint

STEPS, EVAL_EVERY = 12, 4
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.eval_every={EVAL_EVERY}", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    from lmforge.algos.pretrain import build
    from lmforge.run import main

    base = tmp_path_factory.mktemp("kill-resume")
    # Tokenizer and token files first, in-process, so the runs only read the cache.
    build(tiny_cfg(base / "prep", shared_cache, *COMMON), base / "prep")

    rng = random.Random(os.environ.get("LMFORGE_FAULT_SEED"))  # unseeded: another step each time
    kill_at = rng.randint(EVAL_EVERY + 1, STEPS - 2)  # logged steps are 0-based: past the first checkpoint
    term_at = rng.randint(2, STEPS - 3)
    killed, termed = base / "killed", base / "termed"
    victims = {d: launch(d, shared_cache, *COMMON) for d in (killed, termed)}
    sent = signal_at_steps(
        [(victims[killed], killed, kill_at, signal.SIGKILL), (victims[termed], termed, term_at, signal.SIGTERM)]
    )
    victims[killed].wait()
    term_rc = finish(victims[termed], termed)

    # What each victim logged before it stopped (the resumed run's logger starts a new metrics.csv).
    before = {}
    for d in (killed, termed):
        before[d.name] = losses(read_rows(metrics_path(d)))
        shutil.copy(metrics_path(d), d.parent / f"{d.name}-before.csv")
    term_ckpt = load_checkpoint(termed / "checkpoints" / "last.ckpt").raw["global_step"]

    resumed = {d: launch(d, shared_cache, *COMMON, "resume=auto") for d in (killed, termed)}
    # Meanwhile the uninterrupted reference, here, on one thread like the subprocesses.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(tiny_cfg(base / "reference", shared_cache, *COMMON))
    finally:
        torch.set_num_threads(threads)
    rcs = {d.name: finish(p, d) for d, p in resumed.items()}
    return {
        "ref": base / "reference",
        "killed": killed,
        "termed": termed,
        "kill_at": kill_at,
        "term_at": term_at,
        "sent": {d.name: s for d, s in sent.items()},
        "term_rc": term_rc,
        "term_ckpt": term_ckpt,
        "before": before,
        "resume_rcs": rcs,
    }


def assert_same_curve(runs, name: str) -> None:
    ref = dict(losses(read_rows(metrics_path(runs["ref"]))))
    assert sorted(ref) == list(range(STEPS)), ref
    after = losses(read_rows(metrics_path(runs[name])))
    where = f"({name}: signalled at logged step {runs['sent'][name]})"
    for step, loss in runs["before"][name] + after:
        # Steps between the checkpoint and the kill are computed twice: both times like the reference.
        assert loss == ref[step], f"step {step}: {loss!r} != uninterrupted {ref[step]!r} {where}"
    covered = {s for s, _ in runs["before"][name]} | {s for s, _ in after}
    assert covered == set(ref), f"steps missing after resume: {sorted(set(ref) - covered)} {where}"
    final = load_checkpoint(runs[name] / "checkpoints" / "last.ckpt")
    reference = load_checkpoint(runs["ref"] / "checkpoints" / "last.ckpt")
    assert final.raw["global_step"] == STEPS
    for k, v in reference.state_dict.items():
        torch.testing.assert_close(final.state_dict[k], v, rtol=0, atol=0, msg=f"{k} {where}")
    ref_opt = reference.raw["optimizer_states"][0]["state"]
    for i, st in final.raw["optimizer_states"][0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(st[key], ref_opt[i][key], rtol=0, atol=0, msg=f"optimizer {i} {key}")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_auto_matches_uninterrupted_run(runs):
    out = output_of(runs["killed"])
    assert runs["resume_rcs"]["killed"] == 0, out[-3000:]
    assert "resume=auto: resuming from" in out, out[-3000:]
    assert_same_curve(runs, "killed")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_exits_0(runs):
    out = output_of(runs["termed"])
    assert runs["term_rc"] == 0, out[-3000:]
    # The checkpoint holds the step the run had reached: at least the one logged when the signal
    # went out (logged steps are 0-based: logged step s is global step s + 1), at most its last.
    logged = [s for s, _ in runs["before"]["termed"]]
    assert runs["sent"]["termed"] + 1 <= runs["term_ckpt"] <= max(logged) + 1, (runs["term_ckpt"], logged)
    assert runs["term_ckpt"] < STEPS, "the SIGTERM came after the end of training"
    assert f"Preempted at step {runs['term_ckpt']}" in out, out[-3000:]
    assert runs["resume_rcs"]["termed"] == 0, out[-3000:]
    assert_same_curve(runs, "termed")
