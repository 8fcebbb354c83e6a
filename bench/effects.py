"""What each objective does to the modalities on data, against the baselines it must beat.

For every objective at its default and at its paper/official variant, over seeds: fused and
per-modality test accuracy (mean ± std), each modality trained alone (its unimodal ceiling),
the joint-training baseline (``lf``, ``omega: 0``, concat: the fused loss only) and LF
(``omega: 1``), and each method's difference from both. Model selection is by val fused
accuracy; test is read once per run from the best-val checkpoint.

Datasets:
- ``synthetic``: the embedded default (``trainables/synthetic.yaml``);
- ``avdigits-noisy``: AV-digits with Gaussian noise of level ``--image-noise`` on every image of
  train, val and test (fixed per sample);
- ``avdigits-test-noise``: AV-digits trained and selected clean, scored on noisy test images
  (the same runs as ``avdigits-clean``, which is printed too).

The weak modality is the one with the lower unimodal ceiling. A difference is marked ``*``
when it exceeds two standard deviations (the larger of the two rows' seed stds).
Runs are cached under ``--out``: rerunning skips every finished run. ``--extra`` adds rows,
each a label and recipe overrides separated by ``;`` (``--extra "arm (hist)=objective.name=arm;
objective.estimator=fixed_hist"``); ``--objectives`` limits the method rows.

    python bench/effects.py [--datasets synthetic avdigits-noisy avdigits-test-noise]
        [--seeds 0 1 2] [--image-noise 5] [--jobs 2] [--out /tmp/mmbalance-effects]
        [--objectives NAME ...] [--extra "LABEL=key=value;key=value" ...]

``--objectives`` defaults to every registered objective (``mmbalance.objectives.OBJECTIVES``); each
gets its default row plus one row per entry of its class's ``variants`` (label -> overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FSDD_MNIST = REPO.parent / "shared" / "data" / "fsdd_mnist"

BASELINES = {
    "joint (lf, omega 0, concat)": ["objective.name=lf", "objective.omega=0", "model.fusion=concat"],
    "LF (omega 1)": ["objective.name=lf"],
}


@dataclass
class Dataset:
    name: str
    recipe: str
    shards: Path
    trained_as: str  # runs are shared by datasets that differ only in the test transform
    test_noise: float | None = None  # Gaussian level applied to test images at scoring
    modalities: list[str] = field(default_factory=list)


def parse_extra(text: str) -> tuple[str, list[str]]:
    label, sep, rest = text.partition("=")
    overrides = [item.strip() for item in rest.split(";") if item.strip()]
    if not sep or not label.strip() or not overrides or not all("=" in item for item in overrides):
        raise argparse.ArgumentTypeError(f"--extra {text!r} must look like 'LABEL=key.path=value;key.path=value'")
    return label.strip(), overrides


def configurations(objectives: list[str], extra: list[tuple[str, list[str]]] = ()) -> dict[str, list[str]]:
    from mmbalance.objectives import OBJECTIVES

    configs = dict(BASELINES)
    for name in objectives:
        if name == "lf":
            continue
        configs[f"{name} (default)"] = [f"objective.name={name}"]
        for label, overrides in OBJECTIVES[name].cls.variants.items():  # the paper/official variants
            configs[f"{name} ({label})"] = [f"objective.name={name}", *overrides]
    configs.update(extra)
    return configs


def prepare(names: list[str], out: Path, noise: float) -> dict[str, Dataset]:
    from mmbalance.data.avdigits import prepare_avdigits
    from mmbalance.data.corruptions import make_spec
    from mmbalance.data.derive import write_corrupted_copy
    from mmbalance.data.manifest import read_manifest
    from mmbalance.data.synthetic import prepare_synthetic

    data = out / "shards"
    if "synthetic" in names and not (data / "synthetic" / "manifest.json").is_file():
        prepare_synthetic(data / "synthetic", overwrite=True)
    if any(n.startswith("avdigits") for n in names) and not (data / "avdigits" / "manifest.json").is_file():
        prepare_avdigits(FSDD_MNIST, data / "avdigits", overwrite=True)
    noisy = data / f"avdigits-image-noise-{noise:g}"
    if "avdigits-noisy" in names and not (noisy / "manifest.json").is_file():
        spec = make_spec("gaussian", modality="image", level=noise, p=1.0)
        write_corrupted_copy(data / "avdigits", noisy, [spec], overwrite=True)
    datasets = {
        "synthetic": Dataset("synthetic", "synthetic", data / "synthetic", "synthetic"),
        "avdigits-noisy": Dataset(
            f"avdigits, image noise {noise:g} on train+val+test", "avdigits", noisy, f"avdigits-noise-{noise:g}"
        ),
        "avdigits-test-noise": Dataset("avdigits, clean test", "avdigits", data / "avdigits", "avdigits-clean"),
    }
    chosen = {n: datasets[n] for n in names}
    if "avdigits-test-noise" in names:
        chosen["avdigits-test-noise+"] = Dataset(
            f"avdigits, trained clean, image noise {noise:g} on test only",
            "avdigits",
            data / "avdigits",
            "avdigits-clean",
            test_noise=noise,
        )
    for dataset in chosen.values():
        dataset.modalities = list(read_manifest(dataset.shards).modalities)
    return chosen


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (1 thread), or its cached result; returns what the table needs."""
    import torch

    from mmbalance.config import load_recipe_dict, validate_recipe
    from mmbalance.engine.loop import run_training
    from mmbalance.engine.run_spec import RunSpec

    torch.set_num_threads(1)
    run = Path(job["run_dir"])
    tree = load_recipe_dict(
        REPO / "trainables" / f"{job['recipe']}.yaml",
        [
            f"data.path={job['shards']}",
            f"seed={job['seed']}",
            "tracking.wandb=disabled",
            "eval.corruptions=[]",
            *job["overrides"],
        ],
    )
    if job["alone"] is not None:
        tree["modalities"] = {job["alone"]: tree["modalities"][job["alone"]]}
    recipe = validate_recipe(tree).to_dict()
    done = run / "result.json"
    if done.is_file() and (run / "job.json").is_file() and json.loads((run / "job.json").read_text()) == recipe:
        result = json.loads(done.read_text())
    else:
        shutil.rmtree(run, ignore_errors=True)  # a partial run of this bench, under its own --out
        result = run_training(RunSpec.of(recipe, run, verbose=False))
        (run / "job.json").write_text(json.dumps(recipe))
    return {"recipe": recipe, "result": result, "epochs": _read_epochs(run / "metrics.jsonl")}


def _read_epochs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def noisy_test(run_dir: Path, recipe: dict[str, Any], level: float) -> dict[str, float]:
    from mmbalance.engine.evaluation import corrupted, sweep

    table = sweep(run_dir, recipe, "test", {"noisy": corrupted("image", "gaussian", level, 1.0, 0)})
    return table["noisy"]


def jobs_for(datasets: dict[str, Dataset], configs: dict[str, list[str]], seeds: list[int], out: Path) -> list[dict]:
    jobs, seen = [], set()
    for dataset in datasets.values():
        rows = {**configs, **{f"{m} alone": ["objective.name=lf"] for m in dataset.modalities}}
        for label, overrides in rows.items():
            alone = label[: -len(" alone")] if label.endswith(" alone") else None
            for seed in seeds:
                key = (dataset.trained_as, label, seed)
                if key in seen:
                    continue
                seen.add(key)
                slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
                jobs.append(
                    {
                        "key": key,
                        "recipe": dataset.recipe,
                        "shards": str(dataset.shards),
                        "seed": seed,
                        "overrides": overrides,
                        "alone": alone,
                        "run_dir": str(out / "runs" / dataset.trained_as / f"{slug}-seed{seed}"),
                    }
                )
    return jobs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def diff_cell(values: list[float], baseline: list[float]) -> str:
    (a, sa), (b, sb) = mean_std(values), mean_std(baseline)
    mark = "*" if abs(a - b) > 2 * max(sa, sb) else ""
    return f"{a - b:+.4f}{mark}"


def accuracies(dataset: Dataset, runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """fused and per-modality test accuracy of each seed's run (noisy test when asked)."""
    out: dict[str, list[float]] = {"fused": []}
    for run in runs:
        if dataset.test_noise is not None and "image" in run["recipe"]["modalities"]:  # audio alone: no image to noise
            table = noisy_test(Path(run["run_dir"]), run["recipe"], dataset.test_noise)
            values = {"fused": table["acc_fused"], **{m: v for k, v in table.items() if (m := k[4:]) != "fused"}}
        else:
            test = run["result"]["test"]
            values = {"fused": test["acc"], **test["acc_per_modality"]}
        for key, value in values.items():
            out.setdefault(key, []).append(value)
    return out


def diagnostics(runs: list[dict[str, Any]], modalities: list[str]) -> str:
    """Over seeds and epochs: ARM's scales as a geometric mean (reciprocal scales that flip
    between epochs average to 1, not to two values above 1), ARL's mean multipliers; AUG's final
    head counts."""
    parts = []
    if "objective/arm_scale_" + modalities[0] in runs[0]["epochs"][0]:
        means = {
            m: math.exp(statistics.mean(math.log(e["objective/arm_scale_" + m]) for r in runs for e in r["epochs"]))
            for m in modalities
        }
        parts.append("scale (geo. mean) " + " ".join(f"{m} {v:.2f}" for m, v in means.items()))
    if "objective/arl_mult_" + modalities[0] in runs[0]["epochs"][0]:
        means = {
            m: statistics.mean(e["objective/arl_mult_" + m] for r in runs for e in r["epochs"]) for m in modalities
        }
        parts.append("mult " + " ".join(f"{m} {v:.2f}" for m, v in means.items()))
    if "objective/aug_heads_" + modalities[0] in runs[0]["epochs"][-1]:
        heads = {m: statistics.mean(r["epochs"][-1]["objective/aug_heads_" + m] for r in runs) for m in modalities}
        parts.append("heads " + " ".join(f"{m} {v:.1f}" for m, v in heads.items()))
    return "; ".join(parts)


def report(dataset: Dataset, configs: dict[str, list[str]], results: dict[tuple, dict], seeds: list[int]) -> None:
    def runs(label: str) -> list[dict[str, Any]]:
        return [results[(dataset.trained_as, label, s)] for s in seeds]

    alone = {m: accuracies(dataset, runs(f"{m} alone"))["fused"] for m in dataset.modalities}
    weak = min(alone, key=lambda m: statistics.mean(alone[m]))
    strong = max(alone, key=lambda m: statistics.mean(alone[m]))
    rows = {label: accuracies(dataset, runs(label)) for label in configs}
    joint, lf = rows["joint (lf, omega 0, concat)"], rows["LF (omega 1)"]
    print(f"\n### {dataset.name}: seeds {seeds}, test accuracy")
    print("alone: " + ", ".join(f"{m} {cell(v)}" for m, v in alone.items()) + f"  -> weak = {weak}, strong = {strong}")
    print(
        f"| variant | fused | {strong} (strong) | {weak} (weak) | weak − joint | weak − LF | strong − joint "
        f"| strong − LF | fused − joint | fused − LF | diagnostics |"
    )
    print("|---|" + "---|" * 10)
    for label, acc in rows.items():
        diffs = [
            diff_cell(acc[weak], joint[weak]),
            diff_cell(acc[weak], lf[weak]),
            diff_cell(acc[strong], joint[strong]),
            diff_cell(acc[strong], lf[strong]),
            diff_cell(acc["fused"], joint["fused"]),
            diff_cell(acc["fused"], lf["fused"]),
        ]
        print(
            f"| {label} | {cell(acc['fused'])} | {cell(acc[strong])} | {cell(acc[weak])} | "
            + " | ".join(diffs)
            + f" | {diagnostics(runs(label), dataset.modalities)} |"
        )
    print(f"| {weak} trained alone (ceiling) | {cell(alone[weak])} | | | | | | | | | |")


def main() -> None:
    from mmbalance.objectives import OBJECTIVES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["synthetic", "avdigits-noisy", "avdigits-test-noise"],
        choices=["synthetic", "avdigits-noisy", "avdigits-test-noise"],
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--image-noise", type=float, default=5.0, help="Gaussian level on AV-digits images")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmbalance-effects"))
    parser.add_argument("--extra", type=parse_extra, action="append", default=[], help="LABEL=key=value;key=value")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds for a standard deviation")
    datasets = prepare(args.datasets, args.out, args.image_noise)
    configs = configurations(args.objectives, args.extra)
    jobs = jobs_for(datasets, configs, args.seeds, args.out)
    print(f"{len(jobs)} runs ({args.jobs} at a time); finished runs under {args.out} are reused", flush=True)
    results = {}
    context = multiprocessing.get_context("spawn")  # no torch state shared with the workers
    with context.Pool(args.jobs) as pool:
        for done, (job, outcome) in enumerate(zip(jobs, pool.imap(train_one, jobs)), start=1):
            results[job["key"]] = {**outcome, "run_dir": job["run_dir"]}
            print(
                f"[{done}/{len(jobs)}] {' / '.join(map(str, job['key']))}: test {outcome['result']['test']['acc']:.4f}",
                flush=True,
            )
    for dataset in datasets.values():
        report(dataset, configs, results, args.seeds)


if __name__ == "__main__":
    main()
