"""The error the models room raises for problems a person can fix."""

from __future__ import annotations


class ModelError(ValueError):
    """A checkpoint, tokenizer or adapter problem: the message names the path and what was expected."""
