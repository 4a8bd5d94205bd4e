"""Using a trained model: loading a checkpoint for sampling (language_model.py)."""
