"""lmforge: tokenizer -> pretraining -> SFT -> reward model -> PPO on one readable Transformer."""

__version__ = "0.1.0"
