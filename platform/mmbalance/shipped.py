"""The recipes and search spaces that ship with mmbalance, found from any working directory.

``trainables/`` and ``search_spaces/`` sit at the repository root (the layout is fixed). A
checkout (and an editable install) reads them there; a wheel installs them as data files under
``<prefix>/share/mmbalance/``. A ``--recipe`` or search-space argument is a path first; when no
such file exists it is looked up among the shipped files, by its path in the repository
(``trainables/synthetic.yaml``) or by its name (``synthetic``), so ``mmbalance demo`` and
``mmbalance train --recipe synthetic`` work from any directory. Paths *inside* a recipe
(``data.path``) stay relative to the working directory, as each recipe's header says.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from mmbalance.config import ConfigError

STUDY_PREFIX = "study_"
FOLDERS = {
    "recipe": "trainables",
    "search space": "search_spaces",
    "study": "search_spaces",
}  # studies sit beside spaces
CHECKOUT = Path(__file__).resolve().parents[2]  # platform/mmbalance/shipped.py -> the repository root


def shipped_dir(kind: str) -> Path | None:
    """Where the shipped files of ``kind`` ("recipe" or "search space") are, or None."""
    folder = FOLDERS[kind]
    candidates = [CHECKOUT / folder, Path(sysconfig.get_paths()["data"]) / "share" / "mmbalance" / folder]
    return next((c for c in candidates if c.is_dir() and any(c.glob("*.yaml"))), None)


def shipped(kind: str) -> dict[str, Path]:
    """name -> file of every shipped ``kind``, sorted by name."""
    directory = shipped_dir(kind)
    if directory is None:
        return {}
    files = {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    if FOLDERS[kind] != "search_spaces":
        return files
    # Studies and spaces share a folder: a study's file name starts with "study_".
    is_study = kind == "study"
    return {name: path for name, path in files.items() if name.startswith(STUDY_PREFIX) == is_study}


def resolve(kind: str, text: str | Path) -> Path:
    """``text`` as given if that file exists, else the shipped file it names; ConfigError if neither."""
    given = Path(text).expanduser()
    if given.is_file():
        return given
    files = shipped(kind)
    # "synthetic", "synthetic.yaml" and "trainables/synthetic.yaml" name the same shipped recipe.
    in_folder = given.parent in (Path("."), Path(FOLDERS[kind]))
    name = given.stem if in_folder and given.suffix in ("", ".yaml", ".yml") else None
    if name in files:
        return files[name]
    allowed = ", ".join(files) or "none found"
    raise ConfigError(
        f"{kind} {text} does not exist here, and no shipped {kind} has that name "
        f"(shipped: {allowed}; `mmbalance recipes` lists them)"
    )


def purpose(path: Path) -> str:
    """The first comment line of a shipped YAML: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
