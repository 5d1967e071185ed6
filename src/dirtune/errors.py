"""The errors a person can fix: the CLI prints their message (file, line, key, value) and exits 2.

Every module imported here is light (no torch, no transformers): the CLI imports this before
any command runs, so a config error is reported in a fraction of a second.
"""

from __future__ import annotations

import errno

from dirtune.data.records import DataError
from dirtune.models.errors import ModelError
from dirtune.train.config import ConfigError
from dirtune.train.nonfinite import NonFiniteError


# An OSError with one of these is the machine's state, not a bug: the CLI prints it in one line.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENAMETOOLONG})


class UsageError(ValueError):
    """A command used in a way that would lose work or cannot be done (e.g. merging into a
    folder that already holds something, without --overwrite)."""


USER_ERRORS = (ConfigError, DataError, ModelError, NonFiniteError, FileNotFoundError, UsageError)
