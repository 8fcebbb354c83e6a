"""Shard locations: a local path or any URI pyarrow understands (``s3://``, ``gs://``,
``hdfs://``, ``file://``), so the same recipe reads shards from a laptop disk or a bucket."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def local_paths(*paths: str) -> list[str]:
    """The local file system paths among ``paths`` (object-store URIs cannot hold an output)."""
    return [p for p in paths if not is_uri(p)]


def absolute(location: str | Path) -> str:
    """A local path made absolute (other processes and later commands run in other working
    directories); a URI unchanged."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a shard directory or file."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location))


def join(root: str | Path, relative: str) -> str:
    return f"{str(root).rstrip('/')}/{relative}"


def open_input(location: str | Path) -> BinaryIO:
    fs, path = resolve(location)
    return fs.open_input_file(path)


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File
