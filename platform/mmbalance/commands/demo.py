"""``mmbalance demo``: ``prepare synthetic`` + ``compare`` + ``report``, from any directory.

The shipped demo study compares LF, joint training, MNL with its λ × warm-up × guidance ASHA
search, ARL and each modality alone, on one budget."""

from __future__ import annotations

from pathlib import Path

from mmbalance import shipped
from mmbalance.commands.prepare import check_shards_out, print_prepared
from mmbalance.commands.search import SearchOptions, compare
from mmbalance.layout import StudyDir

DEMO_RECIPE = "trainables/synthetic.yaml"
DEMO_STUDY = "search_spaces/study_demo.yaml"
# Measured on 2 CPUs: the demo study takes 2.4 min without W&B, 7 min with every trial logged
# offline (Ray's W&B logger runs a process and a W&B service per trial).
DEMO_WANDB_COST = "logging its 42 trials costs about 4.5 more minutes on 2 CPUs"


def demo(
    out: str = "demo",
    *,
    recipe: str = DEMO_RECIPE,
    study: str = DEMO_STUDY,
    trials: int | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] = (),
    wandb: str = "disabled",
    verbose: bool = False,
) -> Path:
    """The demo owns ``out``: it replaces its own earlier dataset and study, and says so.
    Returns the report's path."""
    from mmbalance.data.synthetic import prepare_synthetic
    from mmbalance.reports.command import write_report

    root = Path(out)
    recipe_file, study_file = shipped.resolve("recipe", recipe), shipped.resolve("study", study)
    shards = root / "shards" / "synthetic"
    study_dir = StudyDir(root / "study")
    check_shards_out(str(shards), overwrite=True)
    if study_dir.path.exists() or shards.exists():
        print(f"replacing the previous demo in {root} (pass --out DIR to keep it)")
    print(f"[1/3] preparing the synthetic dataset in {shards}")
    print_prepared(str(shards), prepare_synthetic(shards, overwrite=True))
    print(f"[2/3] comparing the methods of {study_file} on it (Ray Tune, the same budget for every method)", flush=True)
    if wandb == "disabled":
        print(f"W&B is off for the demo: {DEMO_WANDB_COST} (--wandb offline turns it on)", flush=True)
    options = SearchOptions(
        overrides=[f"data.path={shards}", *overrides, f"tracking.wandb={wandb}"],
        output=str(study_dir.path),
        overwrite=True,
        verbose=verbose,
        command="demo",
    )
    compare(str(study_file), str(recipe_file), options, trials=trials, seeds=seeds)
    print("[3/3] writing the study report")
    report = write_report(study_dir.path)
    print(f"report written to {report}")
    return report
