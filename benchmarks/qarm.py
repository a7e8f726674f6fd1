"""QARM on real data: code assignment cost, then feature-only vs QARM codes vs ID-only and the ablations,
every variant with the same budget through ``run_recbole_fmrl``, plus a cold-start slice of the test users.

    python -m benchmarks.qarm [--dataset=amazon-beauty] [--data_path=../shared/datasets] [--variants=...]
        [--budget=20] [--epochs=200] [--jobs=2] [--threads=1] [--cold_max=5] [--out=DIR]

Writes ``<out>/codes.json`` (``python -m recbole_fmrl.cli.qarm``'s report: pairs, alignment, usage,
collisions, seconds, peak RSS), ``<out>/<variant>.json`` per variant (config, epochs, test metrics of every
size, and the cold slice: test users whose target item has at most ``--cold_max`` training interactions), and
``<out>/summary.md``. A rerun with the same ``--out`` keeps finished variants. ``--out`` defaults to the
git-ignored ``benchmarks/runs/qarm-<dataset>-<UTC time>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recbole_fmrl.fileio import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"

VARIANTS = {
    # The paper's item tower: projected frozen text features, no ID embedding (the CPU profile adds one).
    "features": ("fMRLRec", {"freeze_features": True, "use_id_embedding": False}),
    "id-only": ("fMRLRec", {"modalities": [], "use_id_embedding": True}),
    "qarm": ("QARMRec", {}),  # aligned RQ + VQ codes + the aligned feature
    "qarm-no-align": ("QARMRec", {"qarm_align": False}),
    "qarm-rq": ("QARMRec", {"qarm_codes": ["rq"]}),
    "qarm-vq": ("QARMRec", {"qarm_codes": ["vq"]}),
    "qarm-codes-only": ("QARMRec", {"qarm_use_feature": False}),
}


def slice_metrics(model_file: str, cold_max: int, k: int = 10) -> dict:
    """N@k / R@k at every size over all test users and over the cold slice (target seen <= cold_max times).

    Written out rather than through RecBole's Collector: its metrics average over every user of a loader and
    cannot be restricted to a subset; with one target per user (leave-one-out) both are a rank test.
    """
    import numpy as np
    import torch

    from recbole_fmrl.model.abstract_recommender import speaks_matryoshka
    from recbole_fmrl.quantization.alignment import user_item_matrix
    from recbole_fmrl.quick_start import load_data_and_model

    config, model, _, train, _, test = load_data_and_model(model_file, trust=True)
    counts = np.asarray(user_item_matrix(train._dataset).sum(0)).ravel()
    model.eval()
    sums: dict[str, dict[int, list[float]]] = {"all": {}, "cold": {}}
    users = {"all": 0, "cold": 0}
    with torch.no_grad():
        for interaction, _, _, positive_i in test:
            cold = torch.as_tensor(counts[positive_i.numpy()] <= cold_max)
            users["all"] += len(positive_i)
            users["cold"] += int(cold.sum())
            if speaks_matryoshka(model):
                scored = zip(model.mrl_sizes, model.iter_full_sort_predict_sizes(interaction), strict=True)
            else:
                scored = [(None, model.full_sort_predict(interaction).view(len(positive_i), -1))]
            for size, scores in scored:
                scores = scores.clone()
                scores[:, 0] = -torch.inf
                target = scores.gather(1, positive_i.view(-1, 1))
                rank = (scores > target).sum(1)
                hit = (rank < k).double()
                ndcg = hit / torch.log2(rank.double() + 2)
                for name, mask in (("all", torch.ones_like(cold)), ("cold", cold)):
                    acc = sums[name].setdefault(size, [0.0, 0.0])
                    acc[0] += float(ndcg[mask].sum())
                    acc[1] += float(hit[mask].sum())
    return {
        "cold_max": cold_max,
        "users": users,
        **{
            name: {
                str(size): {
                    f"ndcg@{k}": v[0] / max(users[name], 1),
                    f"recall@{k}": v[1] / max(users[name], 1),
                }
                for size, v in by.items()
            }
            for name, by in sums.items()
        },
    }


def run_slice(args, model_file: str) -> dict:
    """``slice_metrics`` of a saved model, in its own process (it loads the dataset again)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.qarm", "--slice_of", model_file, f"--cold_max={args.cold_max}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-2000:]}


def run_variant(args, variant: str, out: Path) -> dict:
    from recbole_fmrl.benchmark import run_in_subprocess

    model, fixed = VARIANTS[variant]
    config = {
        "data_path": args.data_path,
        "epochs": args.epochs,
        "stopping_step": 5,
        "time_budget": args.budget,
        "checkpoint_dir": str(out / "saved" / variant),
        "train_batch_size": 256,  # README's QARM numbers were measured at it (fMRLRec's CPU profile now has 64)
        **fixed,
    }
    spec = {
        "model": model,
        "dataset": args.dataset,
        "config_files": [],
        "config": config,
        "threads": args.threads,
    }
    start = time.perf_counter()
    result = {"variant": variant, **spec, **run_in_subprocess(spec, cwd=ROOT)}
    if "error" not in result:
        result["slices"] = run_slice(args, result["saved_model_file"])
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def summarise(results: dict[str, dict], codes: dict | None, dataset: str, budget: float) -> str:
    lines = [f"QARM on {dataset}, {budget} min of training per variant (`python -m benchmarks.qarm`).", ""]
    if codes:
        rq, vq = codes.get("rq", {}), codes.get("vq", {})
        lines += [
            f"Code assignment for {codes['items']} items: {codes['code_seconds']} s, process peak RSS "
            f"{codes['peak_rss_mb']} MB; {codes.get('u2i_pairs')} U2I + {codes.get('i2i_pairs')} I2I pairs; nearest "
            f"neighbour co-interacted: {codes.get('neighbour_agreement_raw', float('nan')):.3f} raw, "
            f"{codes.get('neighbour_agreement_aligned', float('nan')):.3f} aligned; RQ {rq.get('levels')} x "
            f"{rq.get('codebook_size')} collision rate {rq.get('collision_rate', float('nan')):.4f}; VQ top-{vq.get('k')}.",
            "",
        ]
    done = [r for r in results.values() if "error" not in r and r.get("valid_history")]
    common = min((len(r["valid_history"]) for r in done), default=0)
    lines += [
        f"Equal budgets can give unequal epochs (the load on the machine varies), so `valid N@10 @ epoch {common}` "
        "compares every variant after the same number of epochs.",
        "",
        f"| variant | model | test N@10 | test R@10 | cold N@10 | cold R@10 | cold users | epochs | stopped by | "
        f"valid N@10 @ epoch {common} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        if "error" in r:
            lines.append(f"| {variant} | {r['model']} | failed: {r['error']} |||||||")
            continue
        test, slices = r["test_result"], r.get("slices", {})
        cold = slices.get("cold", {})
        largest = cold[max(cold, key=int)] if cold else {}
        lines.append(
            f"| {variant} | {r['model']} | {test['ndcg@10']:.4f} | {test['recall@10']:.4f} | "
            f"{largest.get('ndcg@10', float('nan')):.4f} | {largest.get('recall@10', float('nan')):.4f} | "
            f"{slices.get('users', {}).get('cold', '')} | {r['epochs']} | {r['stopped_by']} | "
            f"{r['valid_history'][common - 1]:.4f} |"
        )
    sized = {v: r for v, r in results.items() if r.get("test_result_by_size")}
    if sized:
        sizes = list(next(iter(sized.values()))["test_result_by_size"])
        lines += ["", "Test N@10 at every nesting size:", "", "| variant | " + " | ".join(sizes) + " |"]
        lines.append("|---|" + "---|" * len(sizes))
        for v, r in sized.items():
            by = r["test_result_by_size"]
            lines.append(f"| {v} | " + " | ".join(f"{by[s]['ndcg@10']:.4f}" for s in sizes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser("python -m benchmarks.qarm", description=__doc__.splitlines()[0])
    cli.add_argument("--dataset", default="amazon-beauty")
    cli.add_argument("--data_path", default=str(ROOT.parent / "shared" / "datasets"))
    cli.add_argument("--variants", default=",".join(VARIANTS))
    cli.add_argument("--budget", type=float, default=20.0, help="minutes of training per variant")
    cli.add_argument("--epochs", type=int, default=200)
    cli.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    cli.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    cli.add_argument("--cold_max", type=int, default=5)
    cli.add_argument("--out", default=None)
    cli.add_argument("--slice_of", default=None, help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    if args.slice_of:
        import recbole_fmrl  # noqa: F401  (compat fixes)

        print(json.dumps(slice_metrics(args.slice_of, args.cold_max)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        cli.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    out = (
        Path(args.out)
        if args.out
        else RUNS / time.strftime(f"qarm-{args.dataset}-%Y%m%d-%H%M%S", time.gmtime())
    )
    out.mkdir(parents=True, exist_ok=True)

    codes_file = out / "codes.json"
    if not codes_file.is_file():  # also fills the alignment cache the QARM variants then reuse
        cmd = [
            sys.executable,
            "-m",
            "recbole_fmrl.cli.qarm",
            f"--dataset={args.dataset}",
            f"--out={out / 'coded'}",
        ]
        cmd.append(f"--data_path={args.data_path}")
        subprocess.run(cmd, cwd=ROOT, check=True)
        report = out / "coded" / args.dataset / "qarm-report.json"
        atomic_write_bytes(codes_file, report.read_bytes())
    codes = json.loads(codes_file.read_text())

    results: dict[str, dict] = {}
    todo = []
    for v in variants:
        target = out / f"{v}.json"
        if target.is_file():
            results[v] = json.loads(target.read_text())
            if "error" in results[v].get("slices", {"error": "missing"}):  # a rerun fills a failed slice in
                results[v]["slices"] = run_slice(args, results[v]["saved_model_file"])
                atomic_write_bytes(target, (json.dumps(results[v], indent=2) + "\n").encode())
        else:
            todo.append(v)

    def one(variant: str) -> tuple[str, dict]:
        result = run_variant(args, variant, out)
        if "error" not in result:
            atomic_write_bytes(out / f"{variant}.json", (json.dumps(result, indent=2) + "\n").encode())
        if "error" in result:
            print(f"{variant}: failed: {result['error']}", flush=True)
        else:
            print(f"{variant}: test N@10 {result['test_result']['ndcg@10']:.4f}", flush=True)
        return variant, result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for variant, result in pool.map(one, todo):
            results[variant] = result
    ordered = {v: results[v] for v in variants if v in results}
    table = summarise(ordered, codes, args.dataset, args.budget)
    atomic_write_bytes(out / "summary.md", table.encode())
    atomic_write_bytes(
        (out / "summary.json"), (json.dumps({"codes": codes, "variants": ordered}, indent=2) + "\n").encode()
    )
    print(table + f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
