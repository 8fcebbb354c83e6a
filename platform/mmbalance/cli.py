"""The ``mmbalance`` command line: prepare | train | tune | eval | report | demo | submit | recipes.

Every command validates its whole configuration first and exits with status 2 and a
message naming the bad key when something is wrong, before any data is read or written.
Expected failures (``errors.py``) print one ``mmbalance <command>: error: ...`` message and
exit 2; ``--debug`` or ``MMBALANCE_DEBUG=1`` adds the traceback. ``--overwrite`` replaces only
what mmbalance wrote (``outputs.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmbalance import errors, outputs, shipped
from mmbalance.config import ConfigError, check_against_data, load_recipe, parse_override, set_dotted
from mmbalance.data.convert import CONVERTERS
from mmbalance.data.convert.pipeline import ConversionError
from mmbalance.data import storage
from mmbalance.data.manifest import split_order
from mmbalance.data.shards import validate_shards
from mmbalance.errors import debug_requested, expected_message
from mmbalance.launch.submit import add_submit_parser
from mmbalance.reports.command import add_report_parser
from mmbalance.launch.cluster import DoesNotFit
from mmbalance.tune.search import SECOND_PRESS_MESSAGE, SearchInterrupted

DEFAULT_RECIPE = Path("trainables/synthetic.yaml")
DEFAULT_STUDY = Path("search_spaces/study_demo.yaml")
# Measured on 2 CPUs: the demo study takes 2.4 min without W&B, 7 min with every trial logged
# offline (Ray's W&B logger runs a process and a W&B service per trial).
DEMO_WANDB_COST = "logging its 42 trials costs about 4.5 more minutes on 2 CPUs"


def _prepare_synthetic(args: argparse.Namespace) -> None:
    from mmbalance.data.synthetic import prepare_synthetic

    try:
        spec = _synthetic_spec(args)
    except ValueError as err:  # a spec the generator refuses (pydantic's errors are ValueErrors)
        raise ConfigError(str(err)) from None
    _check_shards_out(args.out, args.overwrite)
    manifest = prepare_synthetic(args.out, spec, overwrite=args.overwrite)
    _print_prepared(args.out, manifest)


def _synthetic_spec(args: argparse.Namespace):
    from mmbalance.data.synthetic import SyntheticSpec

    version = int(args.generator.removeprefix("v"))
    spec = SyntheticSpec(version=version)
    names = args.modalities.split(",") if args.modalities else list(spec.modalities)
    signals = _floats(args.signal, len(names), "--signal") if args.signal else None
    noises = _floats(args.noise, len(names), "--noise") if args.noise else None
    defaults = list(spec.modalities.values())
    modalities = {}
    for i, name in enumerate(names):
        default = defaults[min(i, len(defaults) - 1)]
        base = (default.resized(args.dim) if args.dim else default).model_dump()
        base.update({"signal": signals[i]} if signals else {})
        base.update({"noise": noises[i]} if noises else {})
        modalities[name] = base
    samples = {"train": args.samples, "val": args.val_samples, "test": args.test_samples}
    return SyntheticSpec.model_validate({"version": version, "samples": samples, "classes": args.classes,
                                         "modalities": modalities, "seed": args.seed})


def _floats(text: str, count: int, flag: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != count:
        raise ConfigError(f"{flag} needs {count} comma-separated values (one per modality), got {len(values)}")
    return values


def _prepare_avdigits(args: argparse.Namespace) -> None:
    from mmbalance.data.avdigits import prepare_avdigits

    _check_shards_out(args.out, args.overwrite, reads=[args.root])
    manifest = prepare_avdigits(args.root, args.out, val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite)
    _print_prepared(args.out, manifest)


def _check_shards_out(out: str, overwrite: bool, reads: list[str] = ()) -> None:
    """Before any decoding: an existing --out needs --overwrite and may hold nothing but shards,
    and it must not be a directory the command reads from (or the working directory)."""
    target = Path(out)
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    outputs.check_replaceable(target, outputs.shards_layout(target), reads)


def _prepare_dataset(args: argparse.Namespace) -> None:
    """A raw dataset tree -> shards through the Ray Data conversion pipeline (docs/datasets.md)."""
    from mmbalance.data.convert import build_converter
    from mmbalance.data.convert.pipeline import convert

    settings: dict = {}
    for item in args.set:
        set_dotted(settings, *parse_override(item))
    if getattr(args, "tokenizer", None):
        settings["tokenizer"] = args.tokenizer
    try:
        converter = build_converter(args.dataset, settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if storage.is_uri(args.out):
        raise ConfigError(f"--out {args.out}: conversion writes to a file system path (local or a shared volume); "
                          "copy the finished shards to object storage afterwards (recipes read s3:// and gs:// shards)")
    if not Path(args.root).is_dir():  # before Ray starts (seconds to minutes) and before anything is written
        raise ConfigError(f"--root {args.root}: dataset root does not exist; pass the {args.dataset} folder in its distributed "
                          "layout (docs/datasets.md)")
    _check_shards_out(args.out, args.overwrite, reads=[args.root])
    started_ray = args.engine == "ray" and _start_ray_for_prepare(args)
    try:
        manifest = convert(converter, args.root, args.out, engine=args.engine, skip_bad=args.skip_bad,
                           overwrite=args.overwrite, chunk_size=args.chunk_size)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    _print_prepared(args.out, manifest)
    skipped = manifest.preprocessing.get("skipped_bad", {}).get("count", 0)
    if skipped:
        print(f"skipped {skipped} sample(s) with missing or corrupt files (listed in manifest.json preprocessing.skipped_bad)")


def _start_ray_for_prepare(args: argparse.Namespace) -> bool:
    import ray

    from mmbalance.launch.cluster import choose_address, object_store_bytes

    if ray.is_initialized():
        return False
    address, where = choose_address(args.address)  # --address beats RAY_ADDRESS, as for tune and submit
    if address:
        print(f"Ray address {address} ({where})", flush=True)
        ray.init(address=address, log_to_driver=True)
        return True
    print(f"Ray: starting a local instance ({where})", flush=True)
    ray.init(num_cpus=args.num_cpus, object_store_memory=object_store_bytes(), include_dashboard=False)
    return True


def _print_prepared(out: str, manifest) -> None:
    order = sorted(manifest.splits, key=split_order)
    sizes = ", ".join(f"{split} {manifest.splits[split].rows}" for split in order)
    mods = ", ".join(f"{m} {spec.shape}" for m, spec in manifest.modalities.items())
    print(f"wrote {out}: {manifest.dataset}, {manifest.num_classes} classes, {sizes}; modalities {mods}")


def _train(args: argparse.Namespace) -> dict:
    from mmbalance.engine.loop import run_training
    from mmbalance.engine.run_spec import RunSpec

    overrides = list(args.set) + _tracking_overrides(args)
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"scaling.gpus_per_worker={args.gpus_per_worker}")
    recipe_file = shipped.resolve("recipe", args.recipe)
    recipe = _absolute_data(load_recipe(recipe_file, overrides))
    manifest = validate_shards(recipe.data.path)  # a bad shard stops the run here, before any worker starts
    check_against_data(recipe, manifest)
    output = Path(args.output or Path("runs") / recipe_file.stem)
    _prepare_output(output, resume=args.resume, overwrite=args.overwrite, reads=_local_paths(recipe.data.path))
    use_ray = args.workers is not None or recipe.scaling.workers > 1
    spec = RunSpec(recipe, output, resume=args.resume, shards_checked=True)  # validated above
    started = time.perf_counter()
    if use_ray:
        result = _train_on_ray(spec, manifest, args)
    else:
        result = run_training(spec)
    _print_result(result, output, time.perf_counter() - started)
    return result


def _absolute_data(recipe):
    """The recipe with a local ``data.path`` made absolute: ``config.yaml`` records it, and
    `mmbalance eval` (or a resume) from another directory must find the same data."""
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": storage.absolute(recipe.data.path)})})


def _tracking_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"tracking.wandb": args.wandb, "tracking.project": args.wandb_project, "tracking.entity": args.wandb_entity}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def _add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb", choices=["online", "offline", "disabled"],
                        help="W&B mode (default: the recipe's tracking.wandb, offline); online falls back to offline "
                        "without an API key or network")
    parser.add_argument("--wandb-project", help="W&B project (default: tracking.project)")
    parser.add_argument("--wandb-entity", help="W&B team or user (default: tracking.entity)")


def _add_search_flags(parser: argparse.ArgumentParser, *, what: str, output: str) -> None:
    """What ``tune`` and ``compare`` share: trial resources, where results go, resume, Ray, W&B."""
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument("--workers", type=int, help="workers per trial: 0 trains in the trial process, N >= 1 a TorchTrainer")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker of each trial")
    parser.add_argument("--output", help=output)
    parser.add_argument("--storage", help="Ray storage path for experiment state and checkpoints (s3://, gs://, shared path)")
    parser.add_argument("--resume", action="store_true", help=f"finish an interrupted {what} without re-running finished trials")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} in --output")
    parser.add_argument("--address", help="Ray cluster address (beats RAY_ADDRESS; without either, Ray starts locally)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and W&B's own log lines and warnings")
    _add_tracking_flags(parser)


def _prepare_output(output: Path, *, resume: bool, overwrite: bool, reads: list[str]) -> None:
    """Resume needs a checkpoint; a finished run needs --resume or --overwrite; --overwrite removes
    only what a run writes (Ray's run state included, which would otherwise be restored)."""
    holds_run = (output / "metrics.jsonl").exists() or (output / "config.yaml").exists()
    if resume:
        if not (output / "checkpoints" / "latest").is_dir():
            raise ConfigError(f"--resume: {output} has no checkpoints/latest to resume from")
    elif holds_run and not overwrite:
        raise ConfigError(f"{output} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif overwrite and output.exists():
        outputs.clear(output, outputs.RUN, reads)
    outputs.claim(output, outputs.RUN)


def _local_paths(*paths: str) -> list[str]:
    """The local file system paths among ``paths`` (object-store URIs cannot hold an output)."""
    return [p for p in paths if not storage.is_uri(p)]


def _train_on_ray(spec, manifest, args: argparse.Namespace) -> dict:
    from mmbalance.launch.cluster import Request, check_fits, connect
    from mmbalance.launch.train_driver import fit

    scaling = spec.recipe.scaling
    request = Request(workers=scaling.workers, gpus_per_worker=scaling.gpus_per_worker)
    started_here = connect(request, args.address)
    check_fits(request, autoscaling=not started_here)
    fit(spec, manifest, workers=request.workers, gpus_per_worker=request.gpus_per_worker,
        max_failures=args.max_failures, storage_path=args.storage)
    result_file = spec.output / "result.json"
    if not result_file.is_file():
        raise RuntimeError(f"training finished but {result_file} is missing (on a multi-node cluster --output must be "
                           "on storage every node shares)")
    return json.loads(result_file.read_text())


def _print_result(result: dict, output: Path, seconds: float) -> None:
    test = result["test"]
    per_mod = ", ".join(f"{m} {acc:.4f}" for m, acc in test["acc_per_modality"].items())
    print(f"best val acc {result['val']['best_acc']:.4f} (epoch {result['val']['best_epoch']}); "
          f"test acc {test['acc']:.4f} (per modality: {per_mod}); {seconds:.1f}s")
    print(f"run written to {output} (result.json, metrics.jsonl, config.yaml, checkpoints/)")


def _demo(args: argparse.Namespace) -> None:
    """``prepare synthetic`` + ``compare`` (the shipped demo study: LF, joint training, MNL with
    its λ × warm-up × guidance ASHA search, ARL and each modality alone, on one budget) +
    ``report``, from any directory."""
    from mmbalance.data.synthetic import prepare_synthetic

    root = Path(args.out)
    recipe, study = shipped.resolve("recipe", args.recipe), shipped.resolve("study", args.study)
    shards = root / "shards" / "synthetic"
    _check_shards_out(str(shards), overwrite=True)
    if (root / "study").exists() or shards.exists():
        # The demo owns --out: it replaces its own earlier dataset and study, and says so.
        print(f"replacing the previous demo in {root} (pass --out DIR to keep it)")
    print(f"[1/3] preparing the synthetic dataset in {shards}")
    _print_prepared(str(shards), prepare_synthetic(shards, overwrite=True))
    print(f"[2/3] comparing the methods of {study} on it (Ray Tune, the same budget for every method)", flush=True)
    if args.wandb == "disabled":
        print(f"W&B is off for the demo: {DEMO_WANDB_COST} (--wandb offline turns it on)", flush=True)
    compare_args = argparse.Namespace(
        command=args.command, study=str(study), recipe=str(recipe), set=[f"data.path={shards}", *args.set],
        trials=args.trials, seeds=args.seeds, max_concurrent=None, workers=None, gpus_per_worker=None,
        output=str(root / "study"), storage=None, resume=False, overwrite=True, address=None, wandb=args.wandb,
        wandb_project=None, wandb_entity=None, verbose=args.verbose)
    _compare(compare_args)
    from mmbalance.reports.command import write_report

    print("[3/3] writing the study report")
    print(f"report written to {write_report(root / 'study')}")


IMAGE_LIKE = ("image", "visual", "video", "frames", "rgb")


def _eval(args: argparse.Namespace) -> None:
    import yaml

    from mmbalance.data.corruptions import neutral_fill, parse_levels
    from mmbalance.data.manifest import read_manifest
    from mmbalance.engine.evaluation import corrupted, missing, sweep

    run_dir = Path(args.checkpoint)
    if run_dir.name == "best" and run_dir.parent.name == "checkpoints":
        run_dir = run_dir.parent.parent
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoints" / "best").is_dir():
        raise ConfigError(f"{args.checkpoint}: expected a run directory with config.yaml and checkpoints/best")
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    modalities = list(tree["modalities"])
    data = read_manifest(tree["data"]["path"]).modalities
    transforms = {}
    for item in args.corrupt:
        modality, _, spec = item.rpartition("=")
        name, levels = parse_levels(spec)
        modality = modality or _default_modality(name, modalities)
        for level in levels:
            fill = neutral_fill(data[modality]) if name == "missing" and modality in data else {}
            transforms[f"{name}:{level:g} on {modality}"] = corrupted(modality, name, level, args.p, args.seed, **fill)
    for modality in [m for m in (args.missing or "").split(",") if m]:
        if modality not in modalities:
            raise ConfigError(f"--missing {modality}: not a modality of this run; allowed: {modalities}")
        transforms[f"missing {modality}"] = missing(modality, neutral_fill(data[modality]))
    table = sweep(run_dir, tree, args.split, transforms)
    header = ["condition", "fused", *modalities]
    rows = [[label, *(f"{row[k]:.4f}" for k in ["acc_fused", *[f"acc_{m}" for m in modalities]])] for label, row in table.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, ["-" * w for w in widths], *rows]]
    print(f"{args.split} accuracy of {run_dir} (best-val checkpoint)\n" + "\n".join(lines))
    out = Path(args.out or run_dir / f"eval-{args.split}.json")
    with errors.naming(out):
        out.write_text(json.dumps({"split": args.split, "p": args.p, "seed": args.seed, "accuracy": table}, indent=1) + "\n")
    print(f"written to {out}")


def _default_modality(name: str, modalities: list[str]) -> str:
    candidates = [m for m in modalities if m in IMAGE_LIKE] if name in ("gaussian", "salt_pepper") else []
    if len(candidates) == 1:
        return candidates[0]
    raise ConfigError(f"--corrupt {name}: say which modality, e.g. {modalities[0]}={name}:0,5,10 (modalities: {modalities})")


def _tune(args: argparse.Namespace) -> None:
    """``--set`` stays apart from the recipe file so it can beat the space's ``set:`` (the
    precedence table in README.md); the whole space is validated before the output is touched."""
    from mmbalance.config import load_recipe_dict
    from mmbalance.tune.search import SearchFailed, run_search
    from mmbalance.tune.space import load_space, validate_against

    space_file = shipped.resolve("search space", args.space)
    space = load_space(space_file)
    updates = {k: v for k, v in {"samples": args.samples, "max_concurrent": args.max_concurrent,
                                 "workers": args.workers, "gpus_per_worker": args.gpus_per_worker}.items() if v is not None}
    space = space.model_validate({**space.model_dump(), **updates})
    base = load_recipe_dict(shipped.resolve("recipe", args.recipe))
    overrides = dict(parse_override(item) for item in [*args.set, *_tracking_overrides(args)])
    validate_against(space, base, overrides)  # exit 2 here, before Ray and before the output is touched
    for key in [k for k in overrides if k in space.set]:
        print(f"note: --set {key}={overrides[key]} beats the space's set: {key}: {space.set[key]}")
    output = Path(args.output or Path("runs") / f"tune-{space_file.stem}")
    holds_search = (output / "results.parquet").exists() or (output / "tune").exists()
    if not args.resume and holds_search and not args.overwrite:
        raise ConfigError(f"{output} already holds a search; pass --resume to finish it or --overwrite to replace it")
    if not args.resume and args.overwrite and output.exists():
        data = overrides.get("data.path", (base.get("data") or {}).get("path"))
        outputs.clear(output, outputs.SEARCH, _local_paths(data) if isinstance(data, str) else [])
    outputs.claim(output, outputs.SEARCH)
    print(f"search {space_file}: {space.trial_count()} trials, scheduler {space.scheduler.name}, "
          f"up to {space.max_concurrent} at once, {space.workers or 'in-process'} worker(s) per trial -> {output}")
    try:
        frame = run_search(space, base, output, resume=args.resume, storage=args.storage, address=args.address,
                           overrides=overrides, **_verbosity(args))
    except SearchFailed as err:  # the search ran: exit 1 (2 is for what was refused before it ran)
        if err.frame is not None:
            _print_search(err.frame, space, output)
        print(f"mmbalance {args.command}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    _print_search(frame, space, output)


def _compare(args: argparse.Namespace) -> None:
    """Like ``tune``: the whole study (every method's space against the recipe, equal budgets)
    is validated before Ray starts and before the output is touched."""
    from mmbalance.config import load_recipe_dict
    from mmbalance.reports.verdicts import format_verdicts
    from mmbalance.tune.compare import run_study
    from mmbalance.tune.search import SearchFailed
    from mmbalance.tune.study import load_study, validate_study

    study_file = shipped.resolve("study", args.study)
    study = load_study(study_file)
    updates = {k: v for k, v in {"max_concurrent": args.max_concurrent, "workers": args.workers,
                                 "gpus_per_worker": args.gpus_per_worker}.items() if v is not None}
    if args.seeds:
        updates["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.trials:
        updates["budget"] = {**study.budget.model_dump(), "trials": args.trials}
    study = study.model_validate({**study.model_dump(), **updates})
    base = load_recipe_dict(shipped.resolve("recipe", args.recipe))
    overrides = dict(parse_override(item) for item in [*args.set, *_tracking_overrides(args)])
    methods = validate_study(study, base, overrides)  # exit 2 here, before Ray
    output = Path(args.output or Path("runs") / f"compare-{study_file.stem}")
    holds = (output / "study.json").exists() or (output / "methods").exists()
    if not args.resume and holds and not args.overwrite:
        raise ConfigError(f"{output} already holds a study; pass --resume to finish it or --overwrite to replace it")
    if not args.resume and args.overwrite and output.exists():
        data = overrides.get("data.path", (base.get("data") or {}).get("path"))
        outputs.clear(output, outputs.STUDY, _local_paths(data) if isinstance(data, str) else [])
    outputs.claim(output, outputs.STUDY)
    trials = study.budget.trials * len(study.budget.seeds)
    print(f"study {study_file}: {len(methods)} methods ({', '.join(methods)}), each: {trials} search trials "
          f"({study.budget.scheduler.name}), then its best on val trained on {len(study.seeds)} seeds -> {output}",
          flush=True)
    try:
        _, summary = run_study(study, base, output, resume=args.resume, storage=args.storage, address=args.address,
                               overrides=overrides, say=lambda line: print(line, flush=True), **_verbosity(args))
    except SearchFailed as err:
        print(f"mmbalance {args.command}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print()
    print(format_verdicts(summary))
    print(f"\nstudy: {output / 'study.json'}; results: {output / 'results.parquet'}; "
          f"runs: {output / 'methods'}/<method>/{{search,final}}")


def _print_search(frame, space, output: Path) -> None:
    from mmbalance.reports.tables import format_leaderboard, leaderboard

    keys = [k for k in space.space]
    stopped = int((frame["stop_reason"] == "stopped_early").sum())
    failed = int((frame["stop_reason"] == "error").sum())
    print(f"\n{len(frame)} trials ({stopped} stopped early by {space.scheduler.name}" + (f", {failed} failed)" if failed else ")"))
    print(format_leaderboard(leaderboard(frame, keys), keys))
    print(f"\nresults: {output / 'results.parquet'} (also .csv, .json); trial runs: {output / 'trials'}/<trial id>; "
          f"make the report with: mmbalance report {output}")
    if (output / "wandb").is_dir():
        print(f"W&B runs: {output / 'wandb'} (offline runs upload with: wandb sync {output / 'wandb'}/offline-run-*)")


def _add_dataset_parser(prep_sub, name: str, entry) -> None:
    ds = prep_sub.add_parser(name, help=entry.help,
                             description=f"{entry.help}. Expected raw tree and every setting: docs/datasets.md.")
    ds.add_argument("--root", required=True, help="the dataset folder, in the layout it is distributed in")
    ds.add_argument("--out", required=True, help="shard directory to create (on shared storage for a multi-node cluster)")
    ds.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="preprocessing settings, several after one --set or repeated, e.g. frames=3 image.crop=112")
    if entry.text:
        ds.add_argument("--tokenizer", help="local transformers tokenizer directory (e.g. a saved bert-base-uncased)")
    ds.add_argument("--skip-bad", action="store_true", help="leave out samples whose files are missing or corrupt "
                    "(counted and listed in the manifest) instead of failing")
    ds.add_argument("--engine", choices=["ray", "local"], default="ray",
                    help="ray: a Ray Data pipeline over every CPU of the cluster (default); local: in this process")
    ds.add_argument("--chunk-size", type=int, default=64, help="samples per conversion task (the unit of resume)")
    ds.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray locally)")
    ds.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    ds.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ds.set_defaults(func=_prepare_dataset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmbalance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="write Parquet shards + manifest.json for a dataset")
    prep_sub = prep.add_subparsers(dest="dataset", required=True)
    syn = prep_sub.add_parser("synthetic", help="the embedded seeded synthetic dataset")
    syn.add_argument("--out", required=True, help="shard directory to create")
    syn.add_argument("--samples", type=int, default=4000, help="train samples (default 4000)")
    syn.add_argument("--val-samples", type=int, default=1000)
    syn.add_argument("--test-samples", type=int, default=1000)
    syn.add_argument("--classes", type=int, default=10)
    syn.add_argument("--modalities", help="comma-separated names (default audio,visual; audio dominant)")
    syn.add_argument("--signal", help="comma-separated class-signal strength per modality")
    syn.add_argument("--noise", help="comma-separated noise std per modality")
    syn.add_argument("--dim", type=int, help="feature dimension of every modality (default 32; an XOR code keeps at most dim/2 pairs)")
    syn.add_argument("--generator", choices=["v1", "v2"], default="v2",
                     help="v2: visual class signal an XOR code (learned slowly); v1: the version-1 dataset, byte for byte")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    syn.set_defaults(func=_prepare_synthetic)
    av = prep_sub.add_parser("avdigits", help="spoken digits (FSDD) + MNIST digits, paired by pairs.csv")
    av.add_argument("--root", required=True, help="the fsdd_mnist folder (pairs.csv, audio/, image/)")
    av.add_argument("--out", required=True)
    av.add_argument("--val-fraction", type=float, default=0.1, help="share of train carved out as val, per digit")
    av.add_argument("--seed", type=int, default=0)
    av.add_argument("--overwrite", action="store_true")
    av.set_defaults(func=_prepare_avdigits)
    for name, entry in CONVERTERS.items():
        _add_dataset_parser(prep_sub, name, entry)

    train = sub.add_parser("train", help="train one recipe (in-process, or data-parallel on Ray with --workers)")
    train.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name (mmbalance recipes)")
    train.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="dotted overrides, several after one --set (--set a=1 b=2) or repeated")
    train.add_argument("--output", help="run directory (default runs/<recipe name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    train.add_argument("--workers", type=int, help="data-parallel Ray Train workers (DDP semantics; gloo on CPU, "
                       "NCCL on GPU); without it (and scaling.workers: 1) training runs in-process")
    train.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: scaling.gpus_per_worker)")
    train.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the latest checkpoint")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray locally)")
    train.add_argument("--storage", help="Ray storage path for checkpoints (s3://, gs://, or a shared path; "
                       "default OUTPUT/ray); with --workers only")
    _add_tracking_flags(train)
    train.set_defaults(func=_train)

    tune = sub.add_parser("tune", help="search recipe keys with Ray Tune (ASHA or grids, seeds), then score every trial")
    tune.add_argument("space", help="search space YAML, or a shipped space's name (mmbalance recipes)")
    tune.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name (mmbalance recipes)")
    tune.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="dotted recipe overrides, several after one --set or repeated")
    tune.add_argument("--samples", type=int, help="random draws (overrides the space's samples)")
    _add_search_flags(tune, what="search", output="experiment directory (default runs/tune-<space name>)")
    tune.set_defaults(func=_tune)

    ev = sub.add_parser("eval", help="score a run's best-val checkpoint under corruptions and missing modalities")
    ev.add_argument("checkpoint", help="a run directory (or its checkpoints/best)")
    ev.add_argument("--split", choices=["test", "val"], default="test")
    ev.add_argument("--corrupt", action="append", default=[], metavar="[MODALITY=]NAME:L1,L2",
                    help="e.g. image=gaussian:0,5,10 (repeatable); names: gaussian, salt_pepper, word_replace, audio_snr, feature_noise, missing")
    ev.add_argument("--missing", help="comma-separated modalities to zero, one condition each")
    ev.add_argument("--p", type=float, default=0.5, help="probability a sample is corrupted (MNL protocol: 0.5)")
    ev.add_argument("--seed", type=int, default=0, help="corruption seed (per-sample streams derive from it)")
    ev.add_argument("--out", help="where to write the JSON table (default RUN/eval-<split>.json)")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser("compare", help="equal-budget comparison study: tune every method alike, train each best "
                                         "on several seeds, test the differences")
    cmp.add_argument("study", nargs="?", default="study_papers",
                     help="study YAML, or a shipped study's name (default study_papers: every method; mmbalance recipes)")
    cmp.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name")
    cmp.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                     help="recipe overrides for every method (dotted keys)")
    cmp.add_argument("--trials", type=int, help="search trials per method (overrides the study's budget.trials)")
    cmp.add_argument("--seeds", help="comma-separated seeds of the final runs (overrides the study's seeds)")
    _add_search_flags(cmp, what="study", output="study directory (default runs/compare-<study name>)")
    cmp.set_defaults(func=_compare)
    demo = sub.add_parser("demo", help="prepare the synthetic dataset, run the demo comparison study on it and report it (the README's first command)")
    demo.add_argument("--out", default="demo", help="directory for shards and the study (default ./demo)")
    demo.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="a recipe file or a shipped recipe's name")
    demo.add_argument("--study", default=str(DEFAULT_STUDY), help="a study file or a shipped study's name")
    demo.add_argument("--trials", type=int, help="search trials per method (default: the study's)")
    demo.add_argument("--seeds", help="comma-separated seeds of the final runs (default: the study's)")
    demo.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="dotted recipe overrides, several after one --set or repeated")
    demo.add_argument("--wandb", choices=["online", "offline", "disabled"], default="disabled",
                      help=f"W&B mode of the demo study (default disabled: {DEMO_WANDB_COST})")
    demo.add_argument("--verbose", action="store_true", help="show Ray's and W&B's own log lines and warnings")
    demo.set_defaults(func=_demo)
    recipes = sub.add_parser("recipes", help="list the recipes and search spaces shipped with mmbalance")
    recipes.set_defaults(func=_recipes)
    add_submit_parser(sub)
    add_report_parser(sub)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every command and sub-command, wherever the user types it."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also MMBALANCE_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def _recipes(args: argparse.Namespace) -> None:
    for kind in shipped.FOLDERS:
        files = shipped.shipped(kind)
        where = shipped.shipped_dir(kind)
        print(f"{kind}s ({where}):" if files else f"{kind}s: none shipped with this installation")
        width = max((len(name) for name in files), default=0)
        for name, path in files.items():
            print(f"  {name.ljust(width)}  {shipped.purpose(path)}")


def _verbosity(args: argparse.Namespace) -> dict:
    return {"verbose": bool(getattr(args, "verbose", False))}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        # In a search this is the second Ctrl-C (Tune handles the first): the last state save
        # and the W&B finish were skipped, so say what --resume will find.
        said = SECOND_PRESS_MESSAGE if args.command in ("tune", "demo", "compare") else "interrupted"
        print(f"mmbalance {args.command}: {said}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        sys.stderr.close()
        return 0
    except SearchInterrupted as err:
        print(f"mmbalance {args.command}: interrupted: {err}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one boundary: expected failures become a message
        message = expected_message(err, extra=(ConversionError, DoesNotFit))
        if message is None or debug_requested(getattr(args, "debug", False)):
            raise
        print(f"mmbalance {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
