"""``mmbalance recipes``: the recipes, search spaces and studies shipped with the package."""

from __future__ import annotations

from mmbalance import shipped


def list_shipped() -> None:
    for kind in shipped.FOLDERS:
        files = shipped.shipped(kind)
        where = shipped.shipped_dir(kind)
        print(f"{kind}s ({where}):" if files else f"{kind}s: none shipped with this installation")
        width = max((len(name) for name in files), default=0)
        for name, path in files.items():
            print(f"  {name.ljust(width)}  {shipped.purpose(path)}")
