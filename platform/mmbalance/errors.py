"""The command line's one error boundary: expected failures become one clear message, exit 2.

A user who points a command at a bad recipe, a broken manifest, a read-only or full disk, a
dataset too small for its batch, or an output directory that must not be replaced should read
what is wrong, which key or file, and what to do, never a traceback. Anything not listed here is
a bug and keeps its traceback. ``--debug`` (or ``MMBALANCE_DEBUG=1``) shows the traceback of
expected failures too.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mmbalance.config import ConfigError
from mmbalance.data.corruptions import CorruptionError
from mmbalance.data.manifest import ManifestError
from mmbalance.data.shards import ShardError
from mmbalance.outputs import UnsafeOutput

# Errors whose message already says what, where and what to do.
MESSAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CorruptionError,
    ManifestError,
    ShardError,
    UnsafeOutput,
    FileExistsError,
    FileNotFoundError,
)
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("MMBALANCE_DEBUG", "") not in ("", "0")


def expected_message(err: BaseException, extra: tuple[type[BaseException], ...] = ()) -> str | None:
    """The user-facing message of an expected failure, or None for a bug (re-raise it)."""
    if isinstance(err, MESSAGE_ERRORS + extra):
        return str(err)
    if isinstance(err, OSError) and err.errno in _NO_PERMISSION:
        where = err.filename or "a file"
        return f"cannot write or read {where}: {err.strerror}; choose a location you have write access to"
    if isinstance(err, OSError) and err.errno in _NO_SPACE:
        where = err.filename or "the output"
        return f"no space left for {where}: {err.strerror}; free space or write to another disk"
    return None


@contextlib.contextmanager
def naming(path: str | Path):
    """Inside it, an ``OSError`` that names no file is re-raised naming ``path``: a write to a
    full disk fails in ``write()``, whose error carries no file name."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
