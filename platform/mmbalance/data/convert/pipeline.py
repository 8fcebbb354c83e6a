"""Raw dataset -> shards, as a resumable Ray Data pipeline.

1. The converter lists samples on the driver (names, labels, splits; nothing decoded).
2. Samples, ordered by (split, sample id), are cut into fixed chunks. Ray Data runs one task
   per pending chunk (``from_items`` -> ``map_batches``): decode and extract features, write
   ``<out>.partial/chunks/chunk-NNNNN.parquet`` and a small JSON summary (rows, bad files,
   per-sample sums for train statistics). Tasks spread over every CPU of the cluster.
3. The driver assembles the chunk files, in order, into the final shards (atomically) and
   deletes the work directory.

Resume: a chunk whose summary exists is not redone, so rerunning the same command after an
interruption continues where it stopped. The work directory is keyed by a fingerprint of the
listing and every parameter; if either changed, it starts over. Chunk files depend only on
their samples, so the output is byte-identical whatever the engine, worker count or resume
history. A cluster run needs ``--out`` on storage every node can write (NFS, a shared volume).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbalance import outputs
from mmbalance.data.convert.base import BadInput, Converter, Listing, RawSample, listing_text, missing_files
from mmbalance.data.manifest import Encoding, Manifest, ModalitySpec, Normalization, split_order
from mmbalance.data.shards import rows_per_file_for, rows_table, write_split_tables

Engine = Literal["ray", "local"]
GENERATOR_VERSION = 1


class ConversionError(ValueError):
    """Raw files are missing or corrupt; the message lists them."""


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def convert(
    converter: Converter,
    root: str | Path,
    out: str | Path,
    *,
    engine: Engine = "ray",
    skip_bad: bool = False,
    overwrite: bool = False,
    chunk_size: int = 64,
    progress: Callable[[str], None] | None = None,
    encoding: Encoding = "bytes",
) -> Manifest:
    """Convert the raw tree at ``root`` into shards at ``out``; return the manifest. ``encoding``:
    the tensor columns' layout in the shards (``ModalitySpec.encoding``; chunks are built as
    ``tensor`` and re-encoded when the shards are assembled, so it does not affect resume)."""
    progress = progress or _print_now
    root, out = Path(root), Path(out)
    if out.exists() and not overwrite:  # before any listing or decoding
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists():  # and never replace foreign files or the raw data itself
        outputs.check_replaceable(out, outputs.shards_layout(out), reads=[root])
    listing = converter.list_samples(root)
    absent = missing_files(listing.samples)
    missing = [f"{path} (sample {sid})" for sid, paths in absent.items() for path in paths]
    samples = _usable_samples(listing.samples, absent, missing, skip_bad)
    chunks = _chunks(samples, chunk_size)
    work = work_dir_for(out)
    _open_work_dir(work, _fingerprint(converter, listing, samples, chunk_size), progress)
    pending = [i for i in range(len(chunks)) if not _summary_path(work, i).exists()]
    if len(pending) < len(chunks):
        progress(f"resuming: {len(chunks) - len(pending)} of {len(chunks)} chunks already converted in {work}")
    progress(
        f"converting {len(samples)} samples of {converter.name} in {len(chunks)} chunks "
        f"({len(pending)} to do) with the {engine} engine"
    )
    run = _run_ray if engine == "ray" else _run_local
    _report_progress(run(converter, chunks, pending, work), len(chunks), len(chunks) - len(pending), progress)
    summaries = [json.loads(_summary_path(work, i).read_text()) for i in range(len(chunks))]
    corrupt = [entry for s in summaries for entry in s["bad"]]
    if corrupt and not skip_bad:
        raise ConversionError(
            f"{len(corrupt)} raw file(s) could not be decoded:{listing_text(corrupt)}\n"
            f"Fix or remove them and rerun (converted chunks are kept in {work}), "
            f"or pass --skip-bad to leave those samples out."
        )
    manifest = _assemble(converter, listing, samples, work, out, summaries, missing, corrupt, overwrite, encoding)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _print_now(line: str) -> None:
    # Flushed per line: under `ray job submit` or a pipe, stdout is block-buffered and progress
    # would arrive in one lump at the end.
    print(line, flush=True)


def _usable_samples(
    listed: list[RawSample], absent: dict[str, list[str]], missing: list[str], skip_bad: bool
) -> list[RawSample]:
    if missing and not skip_bad:
        raise ConversionError(
            f"{len(missing)} raw file(s) are missing:{listing_text(missing)}\n"
            f"Pass --skip-bad to convert without those samples."
        )
    samples = [s for s in listed if s.sample_id not in absent]
    dupes = sorted(i for i, n in Counter(s.sample_id for s in samples).items() if n > 1)
    if dupes:
        raise ConversionError(f"sample ids are not unique:{listing_text(dupes)}")
    return sorted(samples, key=lambda s: (split_order(s.split), s.sample_id))


def _chunks(samples: list[RawSample], chunk_size: int) -> list[list[RawSample]]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [samples[i : i + chunk_size] for i in range(0, len(samples), chunk_size)]


def _fingerprint(converter: Converter, listing: Listing, samples: list[RawSample], chunk_size: int) -> str:
    blob = json.dumps(
        {
            "converter": converter.name,
            "version": GENERATOR_VERSION,
            "params": converter.params.model_dump(mode="json"),
            "classes": listing.classes,
            "provenance": listing.provenance,
            # preprocessing() carries content hashes of side inputs (a tokenizer's files),
            # so replacing them in place also invalidates the partial work
            "preprocessing": converter.preprocessing(),
            "chunk_size": chunk_size,
            "samples": [s.to_json() for s in samples],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_work_dir(work: Path, fingerprint: str, progress: Callable[[str], None]) -> None:
    stamp = work / "fingerprint.txt"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        outputs.check_replaceable(work, outputs.CONVERSION_WORK)  # a folder that merely shares the name survives
        progress(f"{work}: left by a conversion with other inputs or parameters; starting over")
        shutil.rmtree(work)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)


def _summary_path(work: Path, index: int) -> Path:
    return work / "chunks" / f"chunk-{index:05d}.json"


def _chunk_path(work: Path, index: int) -> Path:
    return work / "chunks" / f"chunk-{index:05d}.parquet"


def convert_chunk(converter: Converter, index: int, samples: list[RawSample], work: Path) -> dict[str, Any]:
    """Decode one chunk and write its Parquet file and summary (both via rename, so a killed
    task leaves either nothing or a complete chunk). Runs inside a Ray Data task."""
    outputs = converter.outputs()
    specs = {m: o.spec for m, o in outputs.items()}
    good: list[tuple[RawSample, dict[str, np.ndarray]]] = []
    bad: list[str] = []
    for sample in samples:
        try:
            arrays = _stored_values(sample, converter.extract(sample), specs)
            _check_arrays(sample, arrays, specs)
        except BadInput as err:
            bad.append(f"{err} (sample {sample.sample_id})")
            continue
        good.append((sample, arrays))
    stats = {
        m: _per_sample_sums([a for s, a in good if s.split == "train"], m, o.axis)
        for m, o in outputs.items()
        if o.normalize == "train_stats"
    }
    table = _chunk_table(good, specs)
    _write_atomic(_chunk_path(work, index), lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    summary = {
        "index": index,
        "rows": table.num_rows,
        "bad": bad,
        "stats": stats,
        "splits": sorted({s.split for s, _ in good}),
    }
    _write_atomic(_summary_path(work, index), lambda tmp: Path(tmp).write_text(json.dumps(summary)))
    return summary


def _stored_values(sample: RawSample, arrays: dict[str, np.ndarray], specs: dict[str, ModalitySpec]) -> dict:
    """Round a modality stored narrower than its dtype (``ModalitySpec.stored``) to the stored
    type, kept in its dtype: the train statistics and the written rows are then the values the
    reader returns. A value the stored type cannot hold (beyond float16's 65504) is a bad input."""
    out = dict(arrays)
    for m, spec in specs.items():
        if spec.stored is None or out.get(m) is None or out[m].dtype != np.dtype(spec.dtype):
            continue
        with np.errstate(over="ignore"):
            rounded = out[m].astype(spec.stored).astype(spec.dtype)
        if not np.isfinite(rounded[np.isfinite(out[m])]).all():
            raise BadInput(f"modality {m!r} holds values outside the range of {spec.stored}")
        out[m] = rounded
    return out


def _check_arrays(sample: RawSample, arrays: dict[str, np.ndarray], specs: dict[str, ModalitySpec]) -> None:
    for m, spec in specs.items():
        got = arrays.get(m)
        if got is None or tuple(got.shape) != tuple(spec.shape) or got.dtype != np.dtype(spec.dtype):
            detail = None if got is None else (tuple(got.shape), str(got.dtype))
            # A converter bug, not a bad file: fail loudly instead of counting it as corrupt input.
            raise RuntimeError(
                f"converter produced {detail} for {m!r} of sample {sample.sample_id}, "
                f"manifest says {(tuple(spec.shape), spec.dtype)}"
            )


def _per_sample_sums(arrays: list[dict[str, np.ndarray]], modality: str, axis: int | None) -> dict[str, list]:
    """Per sample and channel: sum, sum of squares, count (float64). Summed exactly across
    samples at assembly (math.fsum), so the statistics do not depend on the chunking."""
    sums, squares, counts = [], [], []
    for sample in arrays:
        x = sample[modality].astype(np.float64)
        x = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        sums.append(x.sum(axis=1).tolist())
        squares.append((x * x).sum(axis=1).tolist())
        counts.append(x.shape[1])
    return {"sum": sums, "sumsq": squares, "count": counts}


def _chunk_table(good: list[tuple[RawSample, dict[str, np.ndarray]]], specs: dict[str, ModalitySpec]) -> pa.Table:
    arrays = {
        m: np.stack([a[m] for _, a in good]) if good else np.zeros((0, *spec.shape), spec.dtype)
        for m, spec in specs.items()
    }
    return rows_table(
        [s.sample_id for s, _ in good], [s.label for s, _ in good], [s.split for s, _ in good], arrays, specs
    )


def _write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _run_local(converter: Converter, chunks: list[list[RawSample]], pending: list[int], work: Path) -> Iterator[dict]:
    """Per finished chunk: ``{"index", "rows", "bad"}`` with ``bad`` a count, as ``_run_ray`` yields."""
    for index in pending:
        summary = convert_chunk(converter, index, chunks[index], work)
        yield {"index": index, "rows": summary["rows"], "bad": len(summary["bad"])}


def _ray_task(batch: dict[str, np.ndarray], converter: Converter, work: str) -> dict[str, np.ndarray]:
    rows = []
    for index, payload in zip(batch["index"], batch["samples"]):
        samples = [RawSample.from_json(s) for s in json.loads(payload)]
        summary = convert_chunk(converter, int(index), samples, Path(work))
        rows.append((summary["index"], summary["rows"], len(summary["bad"])))
    return {
        "index": np.array([r[0] for r in rows]),
        "rows": np.array([r[1] for r in rows]),
        "bad": np.array([r[2] for r in rows]),
    }


def _run_ray(converter: Converter, chunks: list[list[RawSample]], pending: list[int], work: Path) -> Iterator[dict]:
    if not pending:
        return
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own per-chunk lines instead
    items = [{"index": i, "samples": json.dumps([s.to_json() for s in chunks[i]])} for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _ray_task, batch_size=1, num_cpus=1, fn_kwargs={"converter": converter, "work": str(work.resolve())}
    )
    for row in ds.iter_rows():
        yield {"index": int(row["index"]), "rows": int(row["rows"]), "bad": int(row["bad"])}


def _report_progress(results: Iterator[dict], total: int, done: int, progress: Callable[[str], None]) -> None:
    started, converted, samples = time.perf_counter(), 0, 0
    try:
        for summary in results:
            converted += 1
            samples += summary["rows"] + summary["bad"]
            elapsed = time.perf_counter() - started
            rate = samples / elapsed if elapsed > 0 else float("inf")
            remaining_chunks = total - done - converted
            eta = remaining_chunks * elapsed / converted
            bad = f", {summary['bad']} bad" if summary["bad"] else ""
            progress(
                f"  chunk {done + converted}/{total} done ({summary['rows']} samples{bad}; "
                f"{rate:.1f} samples/s, about {eta:.0f} s left)"
            )
    except KeyboardInterrupt:
        progress(f"interrupted after {done + converted} of {total} chunks; rerun the same command to resume")
        raise


def _assemble(
    converter: Converter,
    listing: Listing,
    samples: list[RawSample],
    work: Path,
    out: Path,
    summaries: list[dict],
    missing: list[str],
    corrupt: list[str],
    overwrite: bool,
    encoding: Encoding,
) -> Manifest:
    outputs = converter.outputs()
    modalities = {m: _final_spec(m, o, summaries) for m, o in outputs.items()}
    skipped = sorted(missing) + corrupt
    preprocessing = {
        **converter.preprocessing(),
        "params": converter.params.model_dump(mode="json"),
        "split_source": listing.split_source,
        **({"provenance": listing.provenance} if listing.provenance else {}),
        "dropped_by_listing": dict(sorted(listing.dropped.items())),
        "skipped_bad": {
            "count": len(skipped),
            "missing": len(missing),
            "corrupt": len(corrupt),
            "files": skipped[:1000],
        },
    }

    def split_tables(split: str) -> Iterator[pa.Table]:
        for summary in summaries:
            if split not in summary["splits"]:  # samples are ordered by split: most chunks hold one
                continue
            table = pq.read_table(_chunk_path(work, summary["index"]))
            mask = pc.equal(table.column("split"), split)
            part = table.filter(mask)
            if part.num_rows:
                yield part

    splits_present = sorted({s.split for s in samples}, key=split_order)
    return write_split_tables(
        out,
        dataset=converter.name,
        classes=listing.classes,
        modalities=modalities,
        split_tables={split: split_tables(split) for split in splits_present},
        generator={"name": f"mmbalance.data.convert.{converter.name}", "version": GENERATOR_VERSION},
        preprocessing=preprocessing,
        rows_per_file=rows_per_file_for(modalities),
        overwrite=overwrite,
        encoding=encoding,
    )


def _final_spec(modality: str, output, summaries: list[dict]) -> ModalitySpec:
    spec = output.spec
    if output.normalize is None:
        return spec
    if output.normalize == "train_stats":
        mean, std = _combine_stats([s["stats"][modality] for s in summaries], modality)
        source = output.source or "train split"
    else:
        mean, std = output.normalize
        source = output.source
    return spec.model_copy(update={"normalize": Normalization(mean=mean, std=std, axis=output.axis, source=source)})


def _combine_stats(parts: list[dict[str, list]], modality: str) -> tuple[list[float], list[float]]:
    sums = [row for part in parts for row in part["sum"]]
    squares = [row for part in parts for row in part["sumsq"]]
    count = math.fsum(c for part in parts for c in part["count"])
    if not count:
        raise ConversionError(f"no train samples left to compute {modality!r} statistics from")
    mean = [math.fsum(col) / count for col in zip(*sums)]
    var = [max(math.fsum(col) / count - mu * mu, 0.0) for col, mu in zip(zip(*squares), mean)]
    # A constant channel (std 0) would divide by zero; leave it unscaled.
    return mean, [math.sqrt(v) if v > 0 else 1.0 for v in var]
