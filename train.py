"""lmforge's entry point: `python train.py algo=<stage> model=<size> data=<source> key=value ...`.

Hydra composes conf/train.yaml and the command line into one typed config; lmforge.run does the rest.
"""

import sys

import hydra
from omegaconf import DictConfig

from lmforge.config import register_configs
from lmforge.run import main
from lmforge.training.distributed import nonzero_rank_hydra_overrides

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    # Ranks other than zero (torchrun, srun, Lightning's per-rank relaunch) share rank zero's run
    # folder: they write no .hydra/ copy and no train.log there, only to their console.
    sys.argv += nonzero_rank_hydra_overrides()
    train()
