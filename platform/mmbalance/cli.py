"""The ``mmbalance`` command line: prepare | train | tune | eval | report | demo | submit | recipes.

Parsing and dispatch only: each command's work is a typed function in ``commands/`` (or
``launch/submit.py``, ``reports/command.py``), called here with plain arguments. Every command
validates its whole configuration first and exits with status 2 and a message naming the bad
key when something is wrong, before any data is read or written. Expected failures
(``errors.py``) print one ``mmbalance <command>: error: ...`` message and exit 2; ``--debug`` or
``MMBALANCE_DEBUG=1`` adds the traceback. ``--overwrite`` replaces only what mmbalance wrote
(``outputs.py``).
"""

from __future__ import annotations

import argparse
import sys
import typing

from mmbalance.commands.demo import DEMO_RECIPE, DEMO_STUDY, DEMO_WANDB_COST
from mmbalance.data.convert import CONVERTERS
from mmbalance.data.manifest import ENCODINGS
from mmbalance.launch.submit import add_submit_parser
from mmbalance.reports.command import add_report_parser


def _prepare(args: argparse.Namespace) -> None:
    from mmbalance.commands.prepare import prepare
    from mmbalance.config import parse_override, set_dotted

    entry = CONVERTERS[args.dataset]
    if entry.in_memory:
        settings = {name: getattr(args, name) for name in _flag_fields(args.dataset)}
        settings = {k: v for k, v in settings.items() if v is not None}
        prepare(
            args.dataset,
            out=args.out,
            root=getattr(args, "root", None),
            settings=settings,
            overwrite=args.overwrite,
            encoding=args.encoding,
        )
        return
    settings: dict = {}
    for item in args.set:
        set_dotted(settings, *parse_override(item))
    if getattr(args, "tokenizer", None):
        settings["tokenizer"] = args.tokenizer
    prepare(
        args.dataset,
        out=args.out,
        root=args.root,
        settings=settings,
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        engine=args.engine,
        chunk_size=args.chunk_size,
        address=args.address,
        num_cpus=args.num_cpus,
        encoding=args.encoding,
    )


def _train(args: argparse.Namespace) -> dict:
    from mmbalance.commands.train import RayOptions, train

    overrides = list(args.set) + _tracking_overrides(args)
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"scaling.gpus_per_worker={args.gpus_per_worker}")
    return train(
        args.recipe,
        overrides=overrides,
        output=args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        ray=RayOptions(address=args.address, storage=args.storage, max_failures=args.max_failures),
        force_ray=args.workers is not None,
    )


def _eval(args: argparse.Namespace) -> None:
    from mmbalance.commands.evaluate import evaluate

    evaluate(
        args.checkpoint,
        split=args.split,
        corrupt=args.corrupt,
        missing=[m for m in (args.missing or "").split(",") if m],
        p=args.p,
        seed=args.seed,
        out=args.out,
    )


def _search_options(args: argparse.Namespace):
    from mmbalance.commands.search import SearchOptions

    return SearchOptions(
        overrides=[*args.set, *_tracking_overrides(args)],
        max_concurrent=args.max_concurrent,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        output=args.output,
        storage=args.storage,
        resume=args.resume,
        overwrite=args.overwrite,
        address=args.address,
        verbose=args.verbose,
        command=args.command,
    )


def _tune(args: argparse.Namespace) -> None:
    from mmbalance.commands.search import tune

    tune(args.space, args.recipe, _search_options(args), samples=args.samples)


def _compare(args: argparse.Namespace) -> None:
    from mmbalance.commands.search import compare

    compare(args.study, args.recipe, _search_options(args), trials=args.trials, seeds=_seeds(args.seeds))


def _demo(args: argparse.Namespace) -> None:
    from mmbalance.commands.demo import demo

    demo(
        args.out,
        recipe=args.recipe,
        study=args.study,
        trials=args.trials,
        seeds=_seeds(args.seeds),
        overrides=args.set,
        wandb=args.wandb,
        verbose=args.verbose,
    )


def _recipes(args: argparse.Namespace) -> None:
    from mmbalance.commands.recipes import list_shipped

    list_shipped()


def _seeds(text: str | None) -> list[int] | None:
    return [int(s) for s in text.split(",")] if text else None


def _tracking_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"tracking.wandb": args.wandb, "tracking.project": args.wandb_project, "tracking.entity": args.wandb_entity}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def _add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wandb",
        choices=["online", "offline", "disabled"],
        help="W&B mode (default: the recipe's tracking.wandb, offline); online falls back to offline "
        "without an API key or network",
    )
    parser.add_argument("--wandb-project", help="W&B project (default: tracking.project)")
    parser.add_argument("--wandb-entity", help="W&B team or user (default: tracking.entity)")


def _add_search_flags(parser: argparse.ArgumentParser, *, what: str, output: str) -> None:
    """What ``tune`` and ``compare`` share: trial resources, where results go, resume, Ray, W&B."""
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument(
        "--workers", type=int, help="workers per trial: 0 trains in the trial process, N >= 1 a TorchTrainer"
    )
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker of each trial")
    parser.add_argument("--output", help=output)
    parser.add_argument(
        "--storage", help="Ray storage path for experiment state and checkpoints (s3://, gs://, shared path)"
    )
    parser.add_argument(
        "--resume", action="store_true", help=f"finish an interrupted {what} without re-running finished trials"
    )
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} in --output")
    parser.add_argument("--address", help="Ray cluster address (beats RAY_ADDRESS; without either, Ray starts locally)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and W&B's own log lines and warnings")
    _add_tracking_flags(parser)


def _flag_fields(dataset: str) -> dict:
    """An in-memory writer's settings: the fields of its flat ``Params`` model, one ``--flag`` each."""
    from mmbalance.data.convert import converter_class

    return converter_class(dataset).Params.model_fields


def _add_setting_flags(parser: argparse.ArgumentParser, dataset: str) -> None:
    """``--val-samples N`` for the field ``val_samples: int``; a Literal becomes ``choices``."""
    for name, info in _flag_fields(dataset).items():
        kind = info.annotation
        options: dict = {"help": info.description, "default": None}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            options["type"] = args[0]
        parser.add_argument(f"--{name.replace('_', '-')}", **options)


def _add_dataset_parser(prep_sub, name: str, entry) -> None:
    ds = prep_sub.add_parser(
        name, help=entry.help, description=f"{entry.help}. Expected raw tree and every setting: docs/datasets.md."
    )
    if entry.root:
        ds.add_argument("--root", required=True, help=entry.root)
    ds.add_argument(
        "--out", required=True, help="shard directory to create (on shared storage for a multi-node cluster)"
    )
    ds.set_defaults(func=_prepare)
    ds.add_argument(
        "--encoding",
        choices=list(ENCODINGS),
        default=entry.encoding,
        help=f"layout of the tensor columns (default {entry.encoding}): bytes (raw row bytes, uncompressed) "
        "reads about 20x faster and is the layout for shards Ray Data streams every epoch; tensor "
        "(Parquet fixed-size lists, zstd) is smaller for compressible data (docs/data-format.md)",
    )
    if entry.in_memory:
        _add_setting_flags(ds, name)
        ds.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        return
    ds.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="preprocessing settings, several after one --set or repeated, e.g. frames=3 image.crop=112",
    )
    if entry.text:
        ds.add_argument("--tokenizer", help="local transformers tokenizer directory (e.g. a saved bert-base-uncased)")
    ds.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out samples whose files are missing or corrupt "
        "(counted and listed in the manifest) instead of failing",
    )
    ds.add_argument(
        "--engine",
        choices=["ray", "local"],
        default="ray",
        help="ray: a Ray Data pipeline over every CPU of the cluster (default); local: in this process",
    )
    ds.add_argument("--chunk-size", type=int, default=64, help="samples per conversion task (the unit of resume)")
    ds.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray locally)")
    ds.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    ds.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmbalance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="write Parquet shards + manifest.json for a dataset")
    prep_sub = prep.add_subparsers(dest="dataset", required=True)
    for name, entry in CONVERTERS.items():
        _add_dataset_parser(prep_sub, name, entry)

    train = sub.add_parser("train", help="train one recipe (in-process, or data-parallel on Ray with --workers)")
    train.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name (mmbalance recipes)")
    train.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, several after one --set (--set a=1 b=2) or repeated",
    )
    train.add_argument("--output", help="run directory (default runs/<recipe name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    train.add_argument(
        "--workers",
        type=int,
        help="data-parallel Ray Train workers (DDP semantics; gloo on CPU, "
        "NCCL on GPU); without it (and scaling.workers: 1) training runs in-process",
    )
    train.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: scaling.gpus_per_worker)")
    train.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the latest checkpoint")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray locally)")
    train.add_argument(
        "--storage",
        help="Ray storage path for checkpoints (s3://, gs://, or a shared path; "
        "default OUTPUT/ray); with --workers only",
    )
    _add_tracking_flags(train)
    train.set_defaults(func=_train)

    tune = sub.add_parser(
        "tune", help="search recipe keys with Ray Tune (ASHA or grids, seeds), then score every trial"
    )
    tune.add_argument("space", help="search space YAML, or a shipped space's name (mmbalance recipes)")
    tune.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name (mmbalance recipes)")
    tune.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted recipe overrides, several after one --set or repeated",
    )
    tune.add_argument("--samples", type=int, help="random draws (overrides the space's samples)")
    _add_search_flags(tune, what="search", output="experiment directory (default runs/tune-<space name>)")
    tune.set_defaults(func=_tune)

    ev = sub.add_parser("eval", help="score a run's best-val checkpoint under corruptions and missing modalities")
    ev.add_argument("checkpoint", help="a run directory (or its checkpoints/best)")
    ev.add_argument("--split", choices=["test", "val"], default="test")
    ev.add_argument(
        "--corrupt",
        action="append",
        default=[],
        metavar="[MODALITY=]NAME:L1,L2",
        help="e.g. image=gaussian:0,5,10 (repeatable); names: gaussian, salt_pepper, word_replace, audio_snr, "
        "feature_noise, missing",
    )
    ev.add_argument("--missing", help="comma-separated modalities to zero, one condition each")
    ev.add_argument("--p", type=float, default=0.5, help="probability a sample is corrupted (MNL protocol: 0.5)")
    ev.add_argument("--seed", type=int, default=0, help="corruption seed (per-sample streams derive from it)")
    ev.add_argument("--out", help="where to write the JSON table (default RUN/eval-<split>.json)")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser(
        "compare",
        help="equal-budget comparison study: tune every method alike, train each best "
        "on several seeds, test the differences",
    )
    cmp.add_argument(
        "study",
        nargs="?",
        default="study_papers",
        help="study YAML, or a shipped study's name (default study_papers: every method; mmbalance recipes)",
    )
    cmp.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe's name")
    cmp.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every method (dotted keys)",
    )
    cmp.add_argument("--trials", type=int, help="search trials per method (overrides the study's budget.trials)")
    cmp.add_argument("--seeds", help="comma-separated seeds of the final runs (overrides the study's seeds)")
    _add_search_flags(cmp, what="study", output="study directory (default runs/compare-<study name>)")
    cmp.set_defaults(func=_compare)
    demo = sub.add_parser(
        "demo",
        help="prepare the synthetic dataset, run the demo comparison study on it and report it "
        "(the README's first command)",
    )
    demo.add_argument("--out", default="demo", help="directory for shards and the study (default ./demo)")
    demo.add_argument("--recipe", default=DEMO_RECIPE, help="a recipe file or a shipped recipe's name")
    demo.add_argument("--study", default=DEMO_STUDY, help="a study file or a shipped study's name")
    demo.add_argument("--trials", type=int, help="search trials per method (default: the study's)")
    demo.add_argument("--seeds", help="comma-separated seeds of the final runs (default: the study's)")
    demo.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted recipe overrides, several after one --set or repeated",
    )
    demo.add_argument(
        "--wandb",
        choices=["online", "offline", "disabled"],
        default="disabled",
        help=f"W&B mode of the demo study (default disabled: {DEMO_WANDB_COST})",
    )
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
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error (also MMBALANCE_DEBUG=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        # In a search this is the second Ctrl-C (Tune handles the first): the last state save
        # and the W&B finish were skipped, so say what --resume will find.
        from mmbalance.tune.search import SECOND_PRESS_MESSAGE

        said = SECOND_PRESS_MESSAGE if args.command in ("tune", "demo", "compare") else "interrupted"
        print(f"mmbalance {args.command}: {said}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        sys.stderr.close()
        return 0
    except Exception as err:  # noqa: BLE001 - the one boundary: expected failures become a message
        return _failed(args, err)
    return 0


def _failed(args: argparse.Namespace, err: Exception) -> int:
    """An interrupted search exits 130; an expected failure prints one line and exits 2; a bug
    (or ``--debug``) keeps its traceback."""
    from mmbalance.errors import debug_requested, expected_message

    if isinstance(err, _loaded("mmbalance.tune.search", "SearchInterrupted")):
        print(f"mmbalance {args.command}: interrupted: {err}", file=sys.stderr)
        return 130
    extra = _loaded("mmbalance.data.convert.pipeline", "ConversionError") + _loaded(
        "mmbalance.launch.cluster", "DoesNotFit"
    )
    message = expected_message(err, extra=extra)
    if message is None or debug_requested(getattr(args, "debug", False)):
        raise err
    print(f"mmbalance {args.command}: error: {message}", file=sys.stderr)
    return 2


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """``(module.name,)`` if the command imported that module, else ``()``: an error of a module
    that never loaded cannot have been raised, and importing it here (Ray, torch) would cost
    seconds on every failed command."""
    loaded = sys.modules.get(module)
    return (getattr(loaded, name),) if loaded is not None else ()


if __name__ == "__main__":
    sys.exit(main())
