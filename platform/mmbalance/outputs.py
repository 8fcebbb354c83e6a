"""Output directories mmbalance owns: what each kind holds, and replacing one without collateral damage.

``--overwrite`` used to delete the whole output directory, so ``--output .`` in a folder with a
previous run took every file under the working directory with it. Now each kind of output
(a run, a search, a shard directory, a report) has a known layout of top-level entries and a
marker file naming its kind. A directory may be replaced only when everything at its top level
belongs to that layout: anything else is foreign, and the command refuses, naming the first few
foreign paths. Replacing removes the layout's entries and nothing else. Some directories are
never replaced at all: ``/``, a home directory, the working directory (or one holding it), and
any directory that holds the data the command reads.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mmbalance.layout import RunDir, SearchDir, StudyDir

MARKER = ".mmbalance.json"
SHOWN = 5  # foreign paths named in a refusal


class UnsafeOutput(ValueError):
    """An output directory that mmbalance must not replace or write into; the message says why."""


@dataclass(frozen=True)
class Layout:
    """A kind of output and the top-level names (fnmatch patterns) it may hold."""

    kind: str
    entries: tuple[str, ...]

    def owns(self, name: str) -> bool:
        return name == MARKER or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.entries)


# What each directory holds is layout.py's; here only which of its names --overwrite may remove.
RUN = Layout("run", RunDir.ENTRIES)
SEARCH = Layout("search", SearchDir.ENTRIES)
STUDY = Layout("study", StudyDir.ENTRIES)
REPORT = Layout("report", ("report.html", "report.md", "*.png", "wandb_report.json"))
# A conversion's resumable work directory, <out>.partial (data/convert/pipeline.py).
CONVERSION_WORK = Layout("conversion work", ("fingerprint.txt", "chunks"))


def shards_layout(directory: Path) -> Layout:
    """A shard directory holds its manifest and one folder per split the manifest names."""
    splits: tuple[str, ...] = ()
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            splits = tuple(json.loads(manifest.read_text()).get("splits", {}))
        except (ValueError, AttributeError):
            splits = ()  # an unreadable manifest: only the file itself is ours
    return Layout("shards", ("manifest.json", *splits))


def protected_reason(directory: str | Path, reads: Iterable[str | Path] = ()) -> str | None:
    """Why ``directory`` must never be replaced, or None."""
    target = Path(directory).expanduser().resolve()
    if target == Path(target.anchor):
        return "it is the file system root"
    if target == Path.home().resolve():
        return "it is a home directory"
    if target == Path.cwd().resolve():
        return "it is the working directory"
    if target in Path.cwd().resolve().parents:
        return "it holds the working directory"
    for path in reads:
        source = Path(path).expanduser().resolve()
        if source == target or target in source.parents:
            return f"it holds {path}, which this command reads"
    return None


def foreign_entries(directory: str | Path, layout: Layout) -> list[Path]:
    """Top-level entries of ``directory`` that ``layout`` does not own, sorted."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not layout.owns(p.name))


def check_replaceable(directory: str | Path, layout: Layout, reads: Iterable[str | Path] = ()) -> None:
    """Raise ``UnsafeOutput`` unless ``directory`` may be replaced by a new output of ``layout``."""
    root = Path(directory)
    reason = protected_reason(root, reads)
    if reason is not None:
        raise UnsafeOutput(f"{root}: refusing to replace it, {reason}; choose another output directory")
    if root.exists() and not root.is_dir():
        raise UnsafeOutput(f"{root} is a file, not a {layout.kind} directory")
    foreign = foreign_entries(root, layout)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:SHOWN]) + (
            f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        )
        raise UnsafeOutput(
            f"{root} holds files that are not part of a {layout.kind} directory ({shown}); "
            f"refusing to replace it: move them or choose another output directory"
        )


def clear(directory: str | Path, layout: Layout, reads: Iterable[str | Path] = ()) -> None:
    """Remove the entries ``layout`` owns from ``directory`` (after ``check_replaceable``)."""
    root = Path(directory)
    check_replaceable(root, layout, reads)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if layout.owns(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def claim(directory: str | Path, layout: Layout) -> Path:
    """Create ``directory`` if needed and mark it as a ``layout.kind`` output, so a later
    ``--overwrite`` knows what it is replacing. Writing a new output anywhere is allowed; only
    replacing is restricted."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"kind": layout.kind, "written_by": "mmbalance"}) + "\n")
    return root
