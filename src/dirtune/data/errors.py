"""The error the data room raises for problems a person can fix."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem a person can fix: the message names the file, the line and what is accepted."""
