"""Evaluation: held-out generations scored by the synthetic world's judge (heldout.py), reward models
scored on preference pairs and responses (reward_scoring.py), the win rate of one policy's responses
over another's with its confidence interval (winrate.py)."""
