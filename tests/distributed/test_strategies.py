"""DDP, FSDP, two "nodes" and -m sweeps, for real: train.py launched as processes on CPU (gloo).

The reference is one process reading 8 windows per step. Two ranks of 4 read exactly the same
8 (rank r reads global sample i * world_size + r), so with equal global batches the runs must
agree step for step: the validation loss after every step (the same 8 fixed windows, split
over the ranks) and the final weights.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from dist_helpers import TINY, clean_env, column, dist_cache, free_port, read_metrics, run_train, train_cmd  # noqa: F401

from lmforge.training.checkpoint import load_checkpoint
from lmforge.training.wandb_tracking import wandb_run_files

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
# Validate (and checkpoint) after every step: the loss curve is measured on fixed data.
EVERY_STEP = [f"trainer.max_steps={STEPS}", "trainer.eval_every=1"]
ONE_PROCESS = ["algo.batch_size=8", "algo.val_batches=1"]
TWO_RANKS = ["trainer.devices=2", "algo.batch_size=4", "algo.val_batches=2"]


def common(cache: Path) -> list[str]:
    return [*TINY, f"data.cache_dir={cache}"]


def assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert set(sa) == set(sb)
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=0, atol=atol, msg=k)


def assert_same_curve(a: Path, b: Path, key: str = "val/loss", steps: range | None = None) -> None:
    ca, cb = column(read_metrics(a), key), column(read_metrics(b), key)
    if steps is not None:
        ca = {s: v for s, v in ca.items() if s in steps}
        cb = {s: v for s, v in cb.items() if s in steps}
    assert ca and sorted(ca) == sorted(cb), (ca, cb)
    for s in ca:
        assert abs(ca[s] - cb[s]) < 1e-4, (s, ca[s], cb[s])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_cache) -> Path:
    """One process, 8 windows per step, STEPS steps (also warms the token cache)."""
    run = tmp_path_factory.mktemp("single") / "run"
    run_train(*common(dist_cache), *ONE_PROCESS, *EVERY_STEP, f"hydra.run.dir={run}")
    return run


@pytest.fixture(scope="module")
def fsdp_step3(tmp_path_factory, dist_cache, reference) -> Path:
    """Two FSDP ranks, 3 steps, the default consolidated checkpoint."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    run_train(
        *common(dist_cache),
        "strategy=fsdp",
        *TWO_RANKS,
        "trainer.max_steps=3",
        "trainer.eval_every=1",
        f"hydra.run.dir={run}",
    )
    return run


def test_ddp_matches_one_process_and_writes_from_rank_zero_only(tmp_path, dist_cache, reference):
    # The default run folder (outputs/<date>/<time>-...), so that every rank must find it itself.
    run_train(*common(dist_cache), "strategy=ddp", *TWO_RANKS, *EVERY_STEP, "logger=[wandb,csv]", cwd=tmp_path)
    runs = [p.parent for p in tmp_path.rglob(".hydra")]
    assert len(runs) == 1, runs  # one run folder for both ranks
    run = runs[0]
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1
    assert len(list(tmp_path.rglob("hparams.yaml"))) == 1
    assert not [p for p in tmp_path.rglob("*") if "rank" in p.name], "no per-rank files"
    assert len(wandb_run_files(run)) == 1, "one W&B run (offline), created by rank zero only"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").raw["global_step"] == STEPS

    assert_same_curve(reference, run)
    assert_same_weights(reference / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    # The global batch is logged, and the same: 8 x 1 x 1 and 4 x 1 x 2.
    assert set(column(read_metrics(run), "train/global_batch").values()) == {8.0}
    assert set(column(read_metrics(reference), "train/global_batch").values()) == {8.0}


def test_fsdp_trains_saves_resumes_like_one_process(tmp_path, dist_cache, reference, fsdp_step3):
    ckpt3 = load_checkpoint(fsdp_step3 / "checkpoints" / "last.ckpt")
    assert ckpt3.raw["global_step"] == 3
    # The consolidated file is in the single-process format: full tensors, optimizer state
    # numbered like torch.optim's (it loads anywhere: evaluation, init_from, any strategy).
    own = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert {k: v.shape for k, v in ckpt3.state_dict.items()} == {k: v.shape for k, v in own.state_dict.items()}
    osd, ref_osd = ckpt3.raw["optimizer_states"][0], own.raw["optimizer_states"][0]
    assert [g["params"] for g in osd["param_groups"]] == [g["params"] for g in ref_osd["param_groups"]]
    for i, s in ref_osd["state"].items():
        assert osd["state"][i]["exp_avg"].shape == s["exp_avg"].shape

    # Resume under FSDP to STEPS: the same curve and weights as the one-process run.
    run = tmp_path / "fsdp-resumed"
    shutil.copytree(fsdp_step3, run)
    run_train(*common(dist_cache), "strategy=fsdp", *TWO_RANKS, *EVERY_STEP, "resume=auto", f"hydra.run.dir={run}")
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").raw["global_step"] == STEPS
    assert_same_curve(reference, fsdp_step3, steps=range(0, 3))
    assert_same_curve(reference, run, steps=range(3, STEPS))
    assert_same_weights(reference / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")

    # ... and the FSDP checkpoint resumes in a single process too.
    single = tmp_path / "single-from-fsdp"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp_step3 / "checkpoints" / "last.ckpt", single / "checkpoints" / "last.ckpt")
    run_train(*common(dist_cache), *ONE_PROCESS, *EVERY_STEP, "resume=auto", f"hydra.run.dir={single}")
    assert_same_weights(reference / "checkpoints" / "last.ckpt", single / "checkpoints" / "last.ckpt")


def test_ddp_kill_and_resume_matches_one_process_under_ddp_and_fsdp(tmp_path, dist_cache, reference):
    """A DDP run stopped after 3 steps continues to STEPS from its checkpoint, under DDP and under
    FSDP, with the one-process run's loss curve and weights (to float tolerance)."""
    ddp3 = tmp_path / "ddp3"
    run_train(
        *common(dist_cache),
        "strategy=ddp",
        *TWO_RANKS,
        "trainer.max_steps=3",
        "trainer.eval_every=1",
        f"hydra.run.dir={ddp3}",
    )
    assert load_checkpoint(ddp3 / "checkpoints" / "last.ckpt").raw["global_step"] == 3
    assert_same_curve(reference, ddp3, steps=range(0, 3))
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / f"{strategy}-resumed"
        shutil.copytree(ddp3, run)
        run_train(
            *common(dist_cache), f"strategy={strategy}", *TWO_RANKS, *EVERY_STEP, "resume=auto", f"hydra.run.dir={run}"
        )
        assert load_checkpoint(run / "checkpoints" / "last.ckpt").raw["global_step"] == STEPS
        assert_same_curve(reference, run, steps=range(3, STEPS))
        assert_same_weights(reference / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_fsdp_consolidated_checkpoint_matches_sharded_one(tmp_path, dist_cache, fsdp_step3):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = tmp_path / "sharded"
    run_train(
        *common(dist_cache),
        "strategy=fsdp",
        "strategy.save_distributed_checkpoint=true",
        *TWO_RANKS,
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        f"hydra.run.dir={run}",
    )
    folder = run / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2  # one shard per rank
    dcp_to_torch_save(folder, tmp_path / "gathered.pt")
    sharded = torch.load(tmp_path / "gathered.pt", weights_only=True)["state_dict"]
    consolidated = load_checkpoint(fsdp_step3 / "checkpoints" / "last.ckpt").state_dict
    assert set(sharded) == set(consolidated)
    for k, v in consolidated.items():
        torch.testing.assert_close(sharded[k], v, rtol=0, atol=1e-6, msg=k)


def test_two_nodes_on_loopback(tmp_path, dist_cache, reference):
    """Two processes started separately, as on two machines: NODE_RANK 0 and 1, one device each
    (FSDP, hybrid sharding: replicated across the "nodes")."""
    run = tmp_path / "run"
    overrides = [
        *common(dist_cache),
        "strategy=fsdp",
        "strategy.sharding=hybrid",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "algo.batch_size=4",
        "algo.val_batches=2",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        f"hydra.run.dir={run}",
    ]
    port = str(free_port())
    procs = [
        subprocess.Popen(
            train_cmd(*overrides),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK=str(node)),
        )
        for node in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").raw["global_step"] == 2
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1
    assert set(column(read_metrics(run), "train/global_batch").values()) == {8.0}


def test_multirun_sweep_with_ddp(tmp_path, dist_cache, reference):
    """`-m` with ddp: each job launches its own ranks, into its own folder of one sweep."""
    run_train(
        "-m",
        *common(dist_cache),
        "strategy=ddp",
        *TWO_RANKS,
        "trainer.max_steps=1",
        "trainer.eval_every=1",
        "algo.optim.lr=1e-3,2e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    jobs = sorted(p.parent for p in tmp_path.rglob("metrics.csv"))
    assert [j.relative_to(tmp_path).parts[-2:] for j in jobs] == [("0", "csv"), ("1", "csv")], jobs
    for job, lr in zip(jobs, (1e-3, 2e-3)):
        ckpt = load_checkpoint(job.parent / "checkpoints" / "last.ckpt")
        assert ckpt.raw["global_step"] == 1 and ckpt.meta["config"]["algo"]["optim"]["lr"] == lr
    assert not (tmp_path / "outputs").exists(), "no stray run folder"
