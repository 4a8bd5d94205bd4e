"""The one exception type the data layer raises for bad user inputs.

Every ``DataError`` message is meant to be acted on without reading code: it
names the file (and the line, for JSONL; the byte offset, for binary junk),
says what is wrong, and says what to do -- usually which config key to change
or how to fix the file.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data or data config (not a bug in lmforge).

    Subclasses ``ValueError`` so generic callers that already catch bad values
    keep working; catch ``DataError`` to tell data problems apart.
    """
