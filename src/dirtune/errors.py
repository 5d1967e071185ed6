"""The errors a person can fix: the CLI prints their message (file, line, key, value) and exits 2."""

from __future__ import annotations

import errno

from dirtune.data.records import DataError
from dirtune.models.errors import ModelError
from dirtune.train.callbacks import NonFiniteError
from dirtune.train.config import ConfigError

USER_ERRORS = (ConfigError, DataError, ModelError, NonFiniteError, FileNotFoundError)

# An OSError with one of these is the machine's state, not a bug: the CLI prints it in one line.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENAMETOOLONG})
