"""Accuracy on real data: each variant's grid through ``run_recbole_fmrl``, selection on valid NDCG@10.

    python -m benchmarks.accuracy [--dataset=amazon-beauty] [--data_path=../shared/datasets]
        [--variants=SASRec,fMRLRec,fMRLRec-id,LRURec-id,...] [--points=4] [--budget=60] [--epochs=200]
        [--stopping_step=5] [--threads=2] [--jobs=1] [--grid_points=K,VARIANT:K] [--out=DIR]
        [--continue_from=DIR] [--profile=cpu|paper] [--seed=N]

Every variant gets the same tuning budget: the first ``--points`` points of its grid (lr x dropout x batch
size, the defaults first), each trained with early stopping on valid NDCG@10 (patience ``--stopping_step``)
and a wall-clock cap of ``--budget`` minutes (RecBole's ``time_budget``); ``--jobs`` points train at once
(side by side, so they share the machine alike); ``--grid_points`` picks grid points by index instead
(``K`` for every variant, ``VARIANT:K`` for one: a screening run, or a grid split over machines or over
commands sharing ``--out``, which a rerun over all of them then summarises). Each point runs in its own
process, through the same entry, split and evaluation as a user's run. Writes ``<out>/<variant>-<k>.json`` per point
(config, epochs, what stopped it, wall time, valid history, test metrics, test and valid metrics of every
nesting size) and ``<out>/summary.json`` + ``summary.md`` (the best-on-valid point of each variant, beside the
paper's, and its sizes, with the one that a second selection on valid N@10 would serve).
``--out`` defaults to the git-ignored ``benchmarks/runs/accuracy-<UTC time>``. ``--continue_from=DIR`` trains
the points that DIR's run stopped by its budget on from their last validated epoch (the checkpoint saved
beside the best one: ``save_last_checkpoint``; RecBole's resume, with its early-stopping count) for
``--budget`` more minutes, writing the joined record (both runs' epochs and time) to ``--out``; points that
had converged are copied as they were. Each point also keeps ``<variant>-<k>.progress.json`` while it trains
(its record after every validated epoch), so a point whose process is killed (a machine or session that ends)
continues from its last validated epoch the same way. Runs from before the last epoch was saved continue
from their best checkpoint, and train the epochs after it again. ``--profile=paper`` trains the fMRLRec
variants with the paper's GPU defaults (``model/fMRLRec.yaml``: D=1024, 8 sizes, lr 1e-4, batch 32) and their
grid around them, instead of the CPU profile (``profiles/fMRLRec-cpu.yaml``: D=256, batch 64) and its grid;
the other models are the same under both. ``--seed`` sets RecBole's ``seed`` (initialisation, shuffling,
dropout; RecBole's 2020 when not given) for every point: the same point under other seeds shows how far its
metrics move from run to run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recbole_fmrl.fileio import atomic_write, atomic_write_bytes
from recbole_fmrl.quick_start import best_epoch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
CPU_PROFILE = str(ROOT / "properties" / "profiles" / "fMRLRec-cpu.yaml")

# fMRLRec paper, Table 2 (full ranking, leave-one-out, max length 50; BGE-large text + SigLIP image, d=1024).
PAPER = {
    "amazon-beauty": {
        "SASRec": (0.0364, 0.0734),
        "LRURec-id": (0.0438, 0.0871),
        "fMRLRec": (0.0520, 0.0939),
    },
    "amazon-toys": {"LRURec-id": (0.0463, 0.0901), "fMRLRec": (0.0552, 0.0956)},
    "amazon-sports": {"LRURec-id": (0.0266, 0.0536), "fMRLRec": (0.0284, 0.0516)},
}


def _grid(lrs, dropouts, batches, dropout_keys) -> list[dict]:
    """lr x dropout x batch size, the model's defaults (first of each list) first."""
    points = []
    for lr, dropout, batch in itertools.product(lrs, dropouts, batches):
        point = {"learning_rate": lr, "train_batch_size": batch}
        point.update({key: dropout for key in dropout_keys})
        points.append(point)
    return points


_FMRL_GRID = _grid([1e-3, 3e-3], [0.6, 0.3], [256, 64], ("dropout_prob", "attn_dropout_prob"))
# --profile=paper: the official code's lr (1e-4) and batch (32) first, then ten times the lr and four times
# the batch; the same two dropouts.
_FMRL_PAPER_GRID = _grid([1e-4, 1e-3], [0.6, 0.3], [32, 128], ("dropout_prob", "attn_dropout_prob"))
_SASREC_GRID = _grid([1e-3, 3e-3], [0.5, 0.2], [2048, 256], ("hidden_dropout_prob", "attn_dropout_prob"))
_D512 = {"hidden_size": 512, "mrl_sizes": [8, 16, 32, 64, 128, 256, 512]}
_D1024 = {"hidden_size": 1024, "mrl_sizes": [8, 16, 32, 64, 128, 256, 512, 1024]}  # the paper's sizes
VARIANTS = {
    # RecBole's SASRec with its own defaults (CE over all items, hidden 64, 2 layers).
    "SASRec": ("SASRec", {}, _SASREC_GRID),
    # SASRec at twice its default width (feed-forward kept at four times the width): the extra tuning that
    # text-only fMRLRec got by trying D=512 and D=1024 besides its profile's D=256, given to SASRec too.
    "SASRec-h128": ("SASRec", {"hidden_size": 128, "inner_size": 512}, _SASREC_GRID),
    # fMRLRec on the dataset's modalities (text only on the shipped Amazon sets) with the features trained
    # (the official code's --freeze_embed False) and no ID embedding: the CPU profile before it switched to
    # frozen features + IDs (fMRLRec-frozen-id). Each variant pins both keys, so its numbers do not move
    # with the profile.
    "fMRLRec": ("fMRLRec", {"freeze_features": False, "use_id_embedding": False}, _FMRL_GRID),
    # The paper's setting: the features stay frozen, only their projection is learned.
    "fMRLRec-frozen": ("fMRLRec", {"freeze_features": True, "use_id_embedding": False}, _FMRL_GRID),
    # The same two with each feature column standardised (feature_norm: standardize).
    "fMRLRec-std": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "feature_norm": "standardize"},
        _FMRL_GRID,
    ),
    "fMRLRec-frozen-std": (
        "fMRLRec",
        {"freeze_features": True, "use_id_embedding": False, "feature_norm": "standardize"},
        _FMRL_GRID,
    ),
    # The two text-only variants at D=512 (the CPU profile's sizes, then 512), to test whether the profile's
    # D=256 is what holds text-only fMRLRec back.
    "fMRLRec-d512": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, **_D512},
        _FMRL_GRID,
    ),
    "fMRLRec-std-d512": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "feature_norm": "standardize", **_D512},
        _FMRL_GRID,
    ),
    # Trained text at the paper's width and sizes (D=1024), on the CPU profile's grid.
    "fMRLRec-d1024": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, **_D1024},
        _FMRL_GRID,
    ),
    # Trained text with two LRU blocks instead of the paper's one (SASRec's defaults stack two layers), to
    # test whether encoder depth is what keeps text-only fMRLRec below SASRec on R@10.
    "fMRLRec-2blocks": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "n_layers": 2},
        _FMRL_GRID,
    ),
    # Trained text whose feature table learns at a fifth / half of the learning rate (feature_lr_scale):
    # between trained text (1.0; higher N@10) and standardised features, whose unit-scale columns change
    # about 20 times less per Adam step relative to their values (higher R@10).
    "fMRLRec-flr0.2": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "feature_lr_scale": 0.2},
        _FMRL_GRID,
    ),
    "fMRLRec-flr0.5": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "feature_lr_scale": 0.5},
        _FMRL_GRID,
    ),
    # The fifth-rate feature table at D=512: the two text-only changes that each raised R@10 on test at some
    # points (fMRLRec-flr0.2, fMRLRec-d512), together.
    "fMRLRec-flr0.2-d512": (
        "fMRLRec",
        {"freeze_features": False, "use_id_embedding": False, "feature_lr_scale": 0.2, **_D512},
        _FMRL_GRID,
    ),
    # Frozen features plus a trained copy of them (train_feature_copy): frozen text + ID's structure, with
    # the per-item trained part initialised from the text instead of noise; text features only, no IDs.
    "fMRLRec-frozen-copy": (
        "fMRLRec",
        {"freeze_features": True, "train_feature_copy": True, "use_id_embedding": False},
        _FMRL_GRID,
    ),
    # Trained features plus a learned ID embedding.
    "fMRLRec-id": ("fMRLRec", {"use_id_embedding": True, "freeze_features": False}, _FMRL_GRID),
    # Frozen features plus a learned ID embedding: today's CPU profile.
    "fMRLRec-frozen-id": ("fMRLRec", {"use_id_embedding": True, "freeze_features": True}, _FMRL_GRID),
    # fMRLRec-frozen with the nested Mamba encoder instead of the LRU (same features and grid).
    "fMRLRec-mamba": (
        "fMRLRec",
        {"encoder": "mamba", "freeze_features": True, "use_id_embedding": False},
        _FMRL_GRID,
    ),
    # ID-only fMRLRec: the nested LRU on learned item embeddings, our stand-in for LRURec.
    "LRURec-id": ("fMRLRec", {"modalities": [], "use_id_embedding": True}, _FMRL_GRID),
}


def grid(variant: str, profile: str = "cpu") -> list[dict]:
    """The variant's tuning grid: fMRLRec's depends on the profile, the other models' do not."""
    model, _, points = VARIANTS[variant]
    return _FMRL_PAPER_GRID if profile == "paper" and model == "fMRLRec" else points


def _checkpoint_dir(out: Path, variant: str, k: int) -> Path:
    """One folder per point: RecBole names a checkpoint by model and start second, so two points of one
    model started together (``--jobs``) would otherwise write, and test, the same file."""
    return out / "saved" / f"{variant}-{k}"


def _spec(args, variant: str, k: int, point: dict, out: Path) -> dict:
    model, fixed, _ = VARIANTS[variant]
    config = {
        "data_path": args.data_path,
        "epochs": args.epochs,
        "stopping_step": args.stopping_step,
        "time_budget": args.budget,
        "valid_metric": "NDCG@10",
        "checkpoint_dir": str(_checkpoint_dir(out, variant, k)),
        "save_last_checkpoint": True,  # what --continue_from trains on from, beside the best checkpoint
        "log_wandb": False,
        **({"device_profile": "paper"} if args.profile == "paper" and model == "fMRLRec" else {}),
        **({"seed": args.seed} if args.seed is not None else {}),
        **fixed,
        **point,
    }
    return {
        "variant": variant,
        "point": k,
        "model": model,
        "dataset": args.dataset,
        "config_files": [CPU_PROFILE] if model == "fMRLRec" and args.profile == "cpu" else [],
        "config": config,
        "threads": args.threads,
    }


def summarise(results: list[dict], dataset: str) -> tuple[dict, str]:
    """The best-on-valid point of each variant, and a markdown table beside the paper's numbers."""
    best: dict[str, dict] = {}
    for r in results:
        v = r["variant"]
        if v not in best or r["best_valid_score"] > best[v]["best_valid_score"]:
            best[v] = r
    paper = PAPER.get(dataset, {})
    lines = [
        f"Test metrics on {dataset} of the point with the best valid NDCG@10 (points tried per variant: "
        f"{max((sum(r['variant'] == v for r in results) for v in best), default=0)}).",
        "",
        "| variant | test N@10 | test R@10 | paper N@10 / R@10 | epochs (best) | stopped by | train min | s/epoch (with valid) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, r in best.items():
        test = r["test_result"]
        anchor = paper.get(v)
        anchor_text = f"{anchor[0]:.4f} / {anchor[1]:.4f}" if anchor else "n/a"
        lines.append(
            f"| {v} | {test['ndcg@10']:.4f} | {test['recall@10']:.4f} | {anchor_text} | "
            f"{r['epochs']} ({r['best_epoch']}) | {r['stopped_by']} | {r['train_seconds'] / 60:.1f} | "
            f"{r['train_seconds'] / max(r['epochs'] or 1, 1):.0f} |"
        )
    lines += [
        "",
        "Every point tried (the grid is the tuning: the best valid N@10 of each variant picks its row above):",
        "",
        "| variant | point | lr | dropout | batch | best valid N@10 (epoch) | test N@10 | epochs | stopped by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["variant"], r["point"])):
        c = r["config"]
        dropout = c.get("dropout_prob", c.get("hidden_dropout_prob", "default"))
        lines.append(
            f"| {r['variant']} | {r['point']} | {c.get('learning_rate', 'default')} | {dropout} | "
            f"{c.get('train_batch_size', 'default')} | {r['best_valid_score']:.4f} ({r['best_epoch']}) | "
            f"{r['test_result']['ndcg@10']:.4f} | {r['epochs']} | {r['stopped_by']} |"
        )
    sized = [(v, r) for v, r in best.items() if r.get("test_result_by_size")]
    for v, r in sized:
        valid = r.get("valid_result_by_size") or {}  # absent in results from before it was recorded
        lines += [
            "",
            f"{v}, every nesting size (valid N@10 at the same checkpoint, where recorded; test):",
            "",
            "| size | valid N@10 | test N@10 | test R@10 |",
            "|---|---|---|---|",
        ]
        for size, metrics in r["test_result_by_size"].items():
            valid_n10 = f"{valid[size]['ndcg@10']:.4f}" if size in valid else "n/a"
            lines.append(f"| {size} | {valid_n10} | {metrics['ndcg@10']:.4f} | {metrics['recall@10']:.4f} |")
        if valid:
            # Choosing the serving size is a second selection on valid, after the grid point's; ties go to
            # the smaller size. It is reported beside the protocol's pick (the full size), not in its place.
            size = max(valid, key=lambda s: (valid[s]["ndcg@10"], -int(s)))
            test = r["test_result_by_size"][size]
            lines += [
                "",
                f"Size with the best valid N@10 at this point: {size} "
                f"(test N@10 / R@10 {test['ndcg@10']:.4f} / {test['recall@10']:.4f}).",
            ]
    summary = {
        "dataset": dataset,
        "best": {v: {k: r[k] for k in ("point", "config", "test_result", "epochs")} for v, r in best.items()},
        "paper": paper,
    }
    return summary, "\n".join(lines) + "\n"


def _progress_file(out: Path, variant: str, k: int) -> Path:
    return out / f"{variant}-{k}.progress.json"


def _record(path: Path) -> dict:
    """A point's record: a finished one as written; an interrupted one joined to the run it continued."""
    record = json.loads(path.read_text())
    if record["stopped_by"] == "interrupted" and record.get("continues"):
        return continued_result(_record(Path(record["continues"])), record)
    return record


def _earlier_result(parser: argparse.ArgumentParser, source: Path, variant: str, k: int) -> tuple[dict, Path]:
    """The point's record in ``source`` and its file: the finished one, else the progress of a killed run."""
    path = source / f"{variant}-{k}.json"
    if not path.is_file():
        path = _progress_file(source, variant, k)
    if not path.is_file():
        parser.error(f"--continue_from={source}: it has no {variant}-{k}.json; train that point there first")
    return _record(path), path


def _same_seed(parser: argparse.ArgumentParser, args, where: str, record: dict) -> None:
    """One record, one seed: a point finished or begun under another seed is not joined to this run."""
    seed = record["config"].get("seed")
    if seed != args.seed:
        given = "no --seed" if seed is None else f"--seed={seed}"
        parser.error(
            f"{where}: {record['variant']} point {record['point']} was trained with {given}; use it here too"
        )


def _resume_spec(earlier: dict, out: Path) -> dict:
    """Train on from copies of the earlier run's checkpoints, so that run's files stay as they were.

    From its last validated epoch when the run kept one (``save_last_checkpoint``), with the best one beside
    it to test; else (runs from before it was kept) from the best epoch, training the epochs after it again.
    """
    folder = _checkpoint_dir(out, earlier["variant"], earlier["point"])
    best = _copied(earlier, earlier["saved_model_file"], folder)
    last = earlier.get("last_checkpoint_file")
    if last and _absolute(last).is_file():
        return {
            "resume_file": str(_copied(earlier, last, folder)),
            "trust_resume_file": True,
            "resumed_after_epoch": earlier["epochs"] - 1,
        }
    return {"resume_file": str(best), "trust_resume_file": True, "resumed_after_epoch": earlier["best_epoch"]}


def _absolute(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else ROOT / path


def _copied(earlier: dict, path: str, folder: Path) -> Path:
    checkpoint = _absolute(path)
    if not checkpoint.is_file():
        raise SystemExit(
            f"{earlier['variant']} point {earlier['point']}: its checkpoint {checkpoint} is gone"
        )
    return atomic_write(folder / checkpoint.name, lambda tmp: shutil.copyfile(checkpoint, tmp))


def continued_result(earlier: dict, later: dict) -> dict:
    """One point's record over both runs: the history up to the checkpoint it resumed from, then the new one.

    A run resumed from the best checkpoint (one from before the last epoch's was kept) trains the epochs the
    first run spent after it again: their time stays counted in ``train_seconds``, the total of both runs.
    """
    resumed = later.get("resumed_after_epoch", earlier["best_epoch"])
    kept = earlier["valid_history"][: resumed + 1]
    history = kept + later["valid_history"]
    merged = {
        **later,
        "valid_history": history,
        "best_epoch": best_epoch(history),
        "train_seconds": round(earlier["train_seconds"] + later["train_seconds"], 3),
        "wall_seconds": round(earlier["wall_seconds"] + later["wall_seconds"], 1),
        "continued": {
            "resumed_after_epoch": resumed,
            "first_run": {k: earlier[k] for k in ("epochs", "stopped_by", "train_seconds", "config")},
        },
    }
    if later.get("best_valid_result") is None:  # no better epoch than the checkpoint's: its results stand
        merged["best_valid_result"] = earlier["best_valid_result"]
        merged["best_valid_score"] = earlier["best_valid_score"]
    return merged


def _picked_points(parser: argparse.ArgumentParser, args, variants: list[str]) -> dict[str, list[int]] | None:
    """``--grid_points`` as each variant's grid indices, or None (use ``--points``).

    ``K`` picks point K of every variant, ``VARIANT:K`` of that variant only, so one command can regenerate
    a tuning grid whose points differ between models (for example ``SASRec:1,fMRLRec:2``).
    """
    if args.grid_points is None:
        return None
    picked: dict[str, list[int]] = {v: [] for v in variants}
    for entry in (e.strip() for e in args.grid_points.split(",")):
        if not entry:
            continue
        name, _, index = entry.rpartition(":")
        if name and name not in picked:
            parser.error(f"--grid_points={args.grid_points!r}: {name!r} is not among --variants {variants}")
        try:
            k = int(index)
        except ValueError:
            parser.error(f"--grid_points={args.grid_points!r}: give grid indices such as 0,2 or SASRec:1")
        for v in [name] if name else variants:
            size = len(grid(v, args.profile))
            if not 0 <= k < size:
                parser.error(f"--grid_points={args.grid_points!r}: {v}'s indices must lie in 0..{size - 1}")
            if k not in picked[v]:
                picked[v].append(k)
    if not any(picked.values()):
        parser.error(f"--grid_points={args.grid_points!r}: give grid indices such as 0,2 or SASRec:1")
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--points", type=int, default=4, help="grid points per variant (same for all)")
    parser.add_argument("--budget", type=float, default=60.0, help="minutes of training per point")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--stopping_step", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="points trained at once")
    parser.add_argument(
        "--grid_points",
        default=None,
        help="grid indices to train, e.g. 1,2 or SASRec:1,fMRLRec:2 (not --points)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--continue_from",
        default=None,
        help="a finished run's folder: its budget-stopped points train on from their last validated epoch's "
        "checkpoint, which this harness saved there and which is loaded as trusted (pickled), for --budget "
        "more minutes",
    )
    parser.add_argument(
        "--profile",
        choices=["cpu", "paper"],
        default="cpu",
        help="fMRLRec's settings and grid: the CPU profile's (D=256) or the paper's GPU defaults (D=1024)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="RecBole's seed for every point (default: RecBole's own, 2020); one --out per seed",
    )
    args = parser.parse_args(argv)

    from recbole_fmrl.benchmark import run_in_subprocess

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    picked = _picked_points(parser, args, variants)
    out = Path(args.out) if args.out else RUNS / time.strftime("accuracy-%Y%m%d-%H%M%S", time.gmtime())
    source = Path(args.continue_from) if args.continue_from else None
    if source is not None and source.resolve() == out.resolve():
        parser.error("--continue_from and --out must differ: the budget-stopped results stay as they were")
    out.mkdir(parents=True, exist_ok=True)
    results, todo = [], []
    for variant in variants:
        points = grid(variant, args.profile)
        for k in picked[variant] if picked is not None else range(min(args.points, len(points))):
            point = points[k]
            target = out / f"{variant}-{k}.json"
            if target.is_file():  # a rerun resumes: finished points are kept, not retrained
                results.append(json.loads(target.read_text()))
                _same_seed(parser, args, f"--out={out}", results[-1])
                continue
            progress = _progress_file(out, variant, k)
            if progress.is_file():  # a killed point: training it from the start would throw its epochs away
                epochs = json.loads(progress.read_text()).get("epochs")
                parser.error(
                    f"--out={out}: {variant} point {k} was interrupted after {epochs} epochs "
                    f"({progress.name}); continue it with --continue_from={out} and a new --out, or delete "
                    f"{progress.name} to train it from the start"
                )
            earlier, earlier_file = None, None
            if source is not None:
                earlier, earlier_file = _earlier_result(parser, source, variant, k)
                _same_seed(parser, args, f"--continue_from={source}", earlier)
                if earlier["stopped_by"] not in ("time_budget", "interrupted"):  # converged or out of epochs
                    atomic_write_bytes(target, (json.dumps(earlier, indent=2) + "\n").encode())
                    results.append(earlier)
                    continue
            # The checkpoint is copied now: a missing one stops the command before any point trains.
            resume = _resume_spec(earlier, out) if earlier is not None else {}
            if earlier_file is not None:
                resume["continues"] = str(earlier_file.resolve())  # how an interrupted continuation joins up
            todo.append((variant, k, point, target, earlier, {**resume, "progress_file": str(progress)}))

    def train(job) -> dict:
        variant, k, point, target, earlier, resume = job
        spec = {**_spec(args, variant, k, point, out), **resume}
        print(f"{variant} point {k}: {point}" + (f", continued from {source}" if earlier else ""), flush=True)
        result = run_in_subprocess(spec, cwd=ROOT)
        progress = Path(spec.pop("progress_file"))
        if "error" in result:
            kept = (
                f"\nits record up to its last validated epoch is kept in {progress}: --continue_from={out} "
                "trains it on from there"
                if progress.is_file()
                else ""
            )
            print(f"{variant} point {k} failed:\n{result['stderr']}{kept}", file=sys.stderr)
            return {}
        result = {**spec, **result}
        if earlier is not None:
            result = continued_result(earlier, result)
        atomic_write_bytes(target, (json.dumps(result, indent=2) + "\n").encode())
        progress.unlink(missing_ok=True)  # the finished record supersedes it
        test = result["test_result"]
        print(
            f"{variant} point {k}: valid N@10 {result['best_valid_score']:.4f}  test N@10 {test['ndcg@10']:.4f} "
            f"R@10 {test['recall@10']:.4f}  epochs {result['epochs']} ({result['stopped_by']}, "
            f"{result['train_seconds'] / 60:.1f} min)",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        finished = list(pool.map(train, todo))
    if not all(finished):
        return 1
    results += finished
    summary, table = summarise(results, args.dataset)
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out / "summary.md", table.encode())
    print(table + f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
