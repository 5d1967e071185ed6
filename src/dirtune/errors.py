"""The errors a person can fix: the CLI prints their message (file, line, key, value) and exits 2."""

from __future__ import annotations

from dirtune.data.records import DataError
from dirtune.models.errors import ModelError
from dirtune.train.callbacks import NonFiniteError
from dirtune.train.config import ConfigError

USER_ERRORS = (ConfigError, DataError, ModelError, NonFiniteError, FileNotFoundError)
