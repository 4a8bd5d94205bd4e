"""Reward sources for the RL stages (`algo.reward`): what a source is and the callable kind
(source.py), reward models (reward_model.py), and their weighted sum (reward_function.py)."""
