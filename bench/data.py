"""Tokenization MB/s and data-loader throughput against what a train step consumes, as JSON.

    python bench/data.py                       # the default run: synthetic world, tiny, batch 16 x 128
    python bench/data.py --docs 50000 --batch 8 --seq 256 --model target

* tokenizer: SentencePiece encode of the synthetic corpus, one thread and the batch encoder on
  every thread (MB of UTF-8 per second), and build_token_dataset (what a run does once per
  corpus: encode + write the token files) at 1 and 2 threads;
* loader: batches/s of the pretraining DataLoader (random windows of the memory-mapped token
  file), in the training process (data.num_workers=0) and with one worker;
* consumption: tokens/s of a pretraining step of --model at the same batch (eager, fp32), so
  `loader_headroom` = loader tokens/s / step tokens/s says how far the loader is from being the
  bottleneck (it must stay well above 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, emit, machine, model_config, pick_device, sync
from train_step import make_step

from lmforge.data.pretrain_data import RandomWindows
from lmforge.data.sources import Document
from lmforge.data.tokenized import build_token_dataset
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import CausalLM
from lmforge.training.optim import OptimConfig, build_adamw
from lmforge.world.generator import SyntheticWorld


def rate(fn, repeats: int = 3) -> float:
    """Best seconds of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def loader_tokens_per_s(tokens, batch: int, seq: int, workers: int, n_batches: int) -> float:
    ds = RandomWindows(tokens, seq, seed=0, start_sample=0, rank=0, world_size=1)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per batch
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch * seq / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="synthetic pretraining documents (default run: 20000)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="batches drawn per loader measurement")
    p.add_argument("--device", default="auto", help="where the consuming train step runs")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = p.parse_args(argv)
    texts = SyntheticWorld(seed=0).pretrain_documents(args.docs)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    out: dict = {"bench": "data", "machine": machine(pick_device(args.device)), "corpus_mb": round(mb, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tok = train_tokenizer(texts, args.vocab, tmp)
        out["tokenizer_train_s"] = round(time.perf_counter() - t, 2)
        one = rate(lambda: [tok.encode(x) for x in texts])
        batched = rate(lambda: tok.encode_batch(texts))
        out["encode_mb_per_s"] = {"one_thread": round(mb / one, 2), "batch_all_threads": round(mb / batched, 2)}
        docs = [Document(x, f"synthetic:{i}") for i, x in enumerate(texts)]
        build = {}
        for workers in (1, 2):
            t = time.perf_counter()
            ds = build_token_dataset(
                docs,
                tok,
                Path(tmp) / f"w{workers}",
                key="bench",
                val_fraction=0.05,
                num_workers=workers,
                show_progress=False,
            )
            build[f"{workers}_threads"] = round(mb / (time.perf_counter() - t), 2)
        out["build_token_files_mb_per_s"] = build
        out["tokens"] = len(ds.train)
        loader = {f"{w}_workers": loader_tokens_per_s(ds.train, args.batch, args.seq, w, args.batches) for w in (0, 1)}
    device = pick_device(args.device)
    cfg = model_config(args.model, args.seq)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    step = make_step(model, build_adamw(model, OptimConfig()), batch, DTYPES[args.dtype], device)

    def synced_step() -> None:
        step()
        sync(device)

    synced_step()
    step_s = min(rate(synced_step, 1) for _ in range(3))
    step_tok_s = args.batch * args.seq / step_s
    out["loader_tokens_per_s"] = {k: round(v) for k, v in loader.items()}
    out["train_step"] = {
        "model": args.model,
        "device": device.type,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": round(step_tok_s),
    }
    out["loader_headroom"] = round(loader["0_workers"] / step_tok_s, 1)
    emit(out)
    return out


if __name__ == "__main__":
    main()
