"""Evaluation: held-out generations scored by the synthetic world's judge (heldout.py), reward models
scored on preference pairs and responses (reward_scoring.py)."""
