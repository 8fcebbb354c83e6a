"""``mmbalance prepare DATASET``: a dataset of the table in ``data/convert`` -> shards + manifest.

In-memory writers (synthetic, avdigits) build every split in this process; pipeline converters
run through Ray Data (``data/convert/pipeline.py``), on a local Ray or a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmbalance import outputs
from mmbalance.config import ConfigError
from mmbalance.data import storage
from mmbalance.data.convert import CONVERTERS, build_converter
from mmbalance.data.manifest import ENCODINGS, split_order


def prepare(
    name: str,
    *,
    out: str,
    settings: dict[str, Any],
    root: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    engine: str = "ray",
    chunk_size: int = 64,
    address: str | None = None,
    num_cpus: int | None = None,
    encoding: str | None = None,
) -> None:
    """Validate ``settings`` and the paths, then write the shards of dataset ``name`` to ``out``
    with tensor columns in ``encoding`` (``None``: the dataset's default, ``Entry.encoding``)."""
    entry = CONVERTERS[name]
    encoding = encoding or entry.encoding
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding {encoding!r}: expected one of {list(ENCODINGS)}")
    try:
        converter = build_converter(name, settings)
    except ValueError as err:  # a setting the dataset refuses (pydantic's errors are ValueErrors)
        raise ConfigError(str(err)) from None
    if entry.in_memory:
        _write_in_memory(converter, root, out, overwrite, encoding)
        return
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if storage.is_uri(out):
        raise ConfigError(
            f"--out {out}: conversion writes to a file system path (local or a shared volume); "
            "copy the finished shards to object storage afterwards (recipes read s3:// and gs:// shards)"
        )
    if not Path(root).is_dir():  # before Ray starts (seconds to minutes) and before anything is written
        raise ConfigError(
            f"--root {root}: dataset root does not exist; pass the {name} folder in its distributed "
            "layout (docs/datasets.md)"
        )
    check_shards_out(out, overwrite, reads=[root])
    _convert(
        converter,
        root,
        out,
        overwrite=overwrite,
        skip_bad=skip_bad,
        engine=engine,
        chunk_size=chunk_size,
        address=address,
        num_cpus=num_cpus,
        encoding=encoding,
    )


def _write_in_memory(writer, root: str | None, out: str, overwrite: bool, encoding: str) -> None:
    check_shards_out(out, overwrite, reads=[root] if root else [])
    print_prepared(out, writer.write(Path(root) if root else None, out, overwrite=overwrite, encoding=encoding))


def _convert(
    converter,
    root: str,
    out: str,
    *,
    overwrite: bool,
    skip_bad: bool,
    engine: str,
    chunk_size: int,
    address: str | None,
    num_cpus: int | None,
    encoding: str,
) -> None:
    from mmbalance.data.convert.pipeline import convert

    started_ray = engine == "ray" and _start_ray(address, num_cpus)
    try:
        manifest = convert(
            converter,
            root,
            out,
            engine=engine,
            skip_bad=skip_bad,
            overwrite=overwrite,
            chunk_size=chunk_size,
            encoding=encoding,
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print_prepared(out, manifest)
    skipped = manifest.preprocessing.get("skipped_bad", {}).get("count", 0)
    if skipped:
        print(
            f"skipped {skipped} sample(s) with missing or corrupt files "
            "(listed in manifest.json preprocessing.skipped_bad)"
        )


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    import ray

    from mmbalance.launch.cluster import choose_address, object_store_bytes

    if ray.is_initialized():
        return False
    address, where = choose_address(address)  # --address beats RAY_ADDRESS, as for tune and submit
    if address:
        print(f"Ray address {address} ({where})", flush=True)
        ray.init(address=address, log_to_driver=True)
        return True
    print(f"Ray: starting a local instance ({where})", flush=True)
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes(), include_dashboard=False)
    return True


def check_shards_out(out: str, overwrite: bool, reads: list[str] = ()) -> None:
    """Before any decoding: an existing --out needs --overwrite and may hold nothing but shards,
    and it must not be a directory the command reads from (or the working directory)."""
    target = Path(out)
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    outputs.check_replaceable(target, outputs.shards_layout(target), reads)


def print_prepared(out: str, manifest) -> None:
    order = sorted(manifest.splits, key=split_order)
    sizes = ", ".join(f"{split} {manifest.splits[split].rows}" for split in order)
    mods = ", ".join(f"{m} {spec.shape}" for m, spec in manifest.modalities.items())
    print(f"wrote {out}: {manifest.dataset}, {manifest.num_classes} classes, {sizes}; modalities {mods}")
