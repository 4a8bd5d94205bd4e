"""The user errors every layer raises: bad data, a setting or a command line that cannot work.

Every message is meant to be acted on without reading code: it names the file (and the line,
for JSONL), the config key, the value given and what to do instead. The module sits at the
bottom of the package, so the data layer, a stage (algos/), the run's schema (config.py) and the
command lines raise the same types. An unreadable checkpoint is
`lmforge.training.checkpoint.CheckpointError`.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data or data config (not a bug in lmforge).

    Subclasses ``ValueError`` so generic callers that already catch bad values
    keep working; catch ``DataError`` to tell data problems apart.
    """


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key to change."""


class UsageError(ValueError):
    """A command line (`python -m lmforge.<command> ...`) that cannot run, with what to change."""
