"""The user errors every layer raises: a setting or a command line that cannot work.

Their message names the config key, the value given and what to set instead. It sits at the
bottom of the package, so a stage (algos/), the run's schema (config.py) and the composition
root (run.py) raise the same type. The data layer's bad-input type is `lmforge.data.errors.DataError`;
an unreadable checkpoint is `lmforge.training.checkpoint.CheckpointError`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key to change."""


class UsageError(ValueError):
    """A command line (`python -m lmforge.<command> ...`) that cannot run, with what to change."""
