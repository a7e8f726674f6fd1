"""One-command benchmark of plugin and RecBole models: same entry, Config, split and seed; one table, plots.

    python -m recbole_fmrl.benchmark --dataset=amazon-beauty --data_path=../shared/datasets \\
        --models=fMRLRec,SASRec,GRU4Rec [--epochs=N | --time_budget_min=M] [--config_files="a.yaml b.yaml"] \\
        [--out=DIR] [--resume] [--key=value ...]

Every model runs ``run_recbole_fmrl`` in its own process (a failure, such as a model whose extra is missing, is
a row of the table and the others go on; peak memory is per model). Sequential and general models are
tabled apart: their splits differ. Writes under ``--out`` (default ``benchmarks/runs/<dataset>-<UTC time>/``):
``runs/<model>.json`` (full config, result, environment), ``results.json``, ``results.csv``, ``results.md``
and, when there is something to draw, ``metric_vs_size.png`` and ``metric_vs_time.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from recbole_fmrl.cli import cli_entry, config_from_cli, parser
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.fileio import atomic_write_bytes

GROUPS = ("sequential", "general")


def environment() -> dict:
    """Versions and hardware of this machine, saved with every benchmark."""
    import numpy
    import recbole
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recbole": recbole.__version__,
        "numpy": numpy.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def model_group(model: str) -> str:
    """``sequential`` or ``general`` (RecBole's model type; others count as general)."""
    from recbole.utils import ModelType

    from recbole_fmrl.utils import get_model

    return "sequential" if get_model(model).type == ModelType.SEQUENTIAL else "general"


def run_model(spec: dict) -> dict:
    """Train and test one model in this process (the ``--child`` side); JSON-ready result.

    With ``spec["progress_file"]``, the spec and the training record so far are written there after every
    validated epoch (``stopped_by: interrupted``), so a process killed mid-run leaves what it had done.
    """
    import torch

    import recbole_fmrl  # noqa: F401  (compat fixes)
    from recbole_fmrl.quick_start import run_recbole_fmrl

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    start = time.perf_counter()
    on_epoch = None
    if spec.get("progress_file"):
        progress_file = Path(spec["progress_file"])

        def on_epoch(progress: dict) -> None:
            record = {**spec, **progress, "wall_seconds": round(time.perf_counter() - start, 1)}
            atomic_write_bytes(progress_file, (json.dumps(plain(record), indent=2) + "\n").encode())

    result = run_recbole_fmrl(
        model=spec["model"],
        dataset=spec["dataset"],
        config_file_list=spec["config_files"] or None,
        config_dict=spec["config"],
        saved=True,
        cli_args=[],
        resume_file=spec.get("resume_file"),
        trust=bool(spec.get("trust_resume_file")),
        on_epoch=on_epoch,
    )
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["environment"] = environment()
    return plain(result)


def plain(value):
    """A JSON-ready copy: numpy scalars become Python numbers, mappings become dicts."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def run_in_subprocess(spec: dict, cwd: str | Path | None = None) -> dict:
    """``run_model(spec)`` in a fresh Python; a failure comes back as ``{"error": last stderr line}``."""
    cmd = [sys.executable, "-m", "recbole_fmrl.benchmark", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    errors = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {
        "error": errors[-1] if errors else f"exit status {proc.returncode}",
        "stderr": proc.stderr[-4000:],
    }


def row_of(model: str, group: str, result: dict, metrics: list[str]) -> dict:
    """The table row of one model: params, epochs, seconds per epoch, peak RSS, valid/test metrics."""
    if "error" in result:
        return {"model": model, "group": group, "status": f"failed: {result['error']}"}
    epochs = result.get("epochs") or 0
    row = {
        "model": model,
        "group": group,
        "status": f"ok ({result.get('stopped_by')})",
        "params": result.get("params"),
        "epochs": epochs,
        "sec_per_epoch": round(result["train_seconds"] / epochs, 1) if epochs else None,
        "train_seconds": result.get("train_seconds"),
        "peak_rss_mb": result.get("peak_rss_mb"),
    }
    for split, key in (("valid", "best_valid_result"), ("test", "test_result")):
        for metric in metrics:
            value = (result.get(key) or {}).get(metric)
            row[f"{split} {metric}"] = None if value is None else round(float(value), 4)
    return row


def size_rows(model: str, result: dict, metrics: list[str]) -> list[dict]:
    """Test metrics of every nesting size of a nested model."""
    by_size = result.get("test_result_by_size") or {}
    return [
        {"model": f"{model} @ {size}", **{f"test {m}": round(float(v[m]), 4) for m in metrics if m in v}}
        for size, v in by_size.items()
    ]


def markdown(rows: list[dict], sized: list[dict], metrics: list[str], dataset: str, command: str) -> str:
    """Tables per model group, then per-size rows of the nested models."""
    lines = [f"Benchmark on {dataset}. Command: `{command}`", ""]
    columns = ["model", "status", "params", "epochs", "sec_per_epoch", "peak_rss_mb"]
    columns += [f"{s} {m}" for s in ("valid", "test") for m in metrics]
    for group in GROUPS:
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        lines += [f"### {group} models", "", "| " + " | ".join(columns) + " |"]
        lines.append("|" + "---|" * len(columns))
        for r in members:
            lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")
        lines.append("")
    if sized:
        size_columns = ["model", *(f"test {m}" for m in metrics)]
        lines += ["### every nesting size (test)", "", "| " + " | ".join(size_columns) + " |"]
        lines.append("|" + "---|" * len(size_columns))
        for r in sized:
            lines.append(
                "| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in size_columns) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plots(results: dict[str, dict], metric: str, out: Path) -> list[Path]:
    """metric vs size (nested models' curves, baselines as flat lines) and metric vs train time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = {m: r for m, r in results.items() if "error" not in r and metric in (r.get("test_result") or {})}
    nested = {m: r for m, r in done.items() if r.get("test_result_by_size")}
    written = []
    if nested:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, r in nested.items():
            sizes = [int(s) for s in r["test_result_by_size"]]
            ax.plot(sizes, [r["test_result_by_size"][str(s)][metric] for s in sizes], marker="o", label=model)
        for model, r in done.items():
            if model not in nested:
                ax.axhline(r["test_result"][metric], linestyle="--", linewidth=1, label=model)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="embedding size", ylabel=f"test {metric}", title=f"test {metric} by size")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "metric_vs_size.png"))
    if done:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, r in done.items():
            ax.scatter(r["train_seconds"], r["test_result"][metric])
            ax.annotate(model, (r["train_seconds"], r["test_result"][metric]), fontsize=7)
        ax.set(
            xlabel="train seconds (with validation)", ylabel=f"test {metric}", title=f"test {metric} vs time"
        )
        written.append(_save(fig, out / "metric_vs_time.png"))
    return written


def _save(fig, path: Path) -> Path:
    import io

    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _cli():
    cli = parser("python -m recbole_fmrl.benchmark", __doc__.splitlines()[0])
    cli.add_argument("--models", default="", help="comma-separated plugin or RecBole model names")
    cli.add_argument("--dataset", "-d", default="mm-sample")
    cli.add_argument(
        "--epochs", type=int, default=None, help="epochs per model (early stopping still applies)"
    )
    cli.add_argument(
        "--time_budget_min", type=float, default=None, help="the same wall-clock budget per model"
    )
    cli.add_argument("--config_files", default=None, help="space-separated yaml files applied to every model")
    cli.add_argument(
        "--out", default=None, help="output folder (default benchmarks/runs/<dataset>-<UTC time>)"
    )
    cli.add_argument("--resume", action="store_true", help="keep the models already finished in --out")
    cli.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return cli


def _main(argv: list[str]) -> int:
    args, overrides = config_from_cli(argv, _cli())
    if args.child:
        print(json.dumps(run_model(json.loads(args.child))))
        return 0
    from recbole_fmrl.utils import get_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ConfigError("--models is empty: name at least one model, e.g. --models=fMRLRec,SASRec.")
    for model in models:
        get_model(model)  # an unknown name is one clear error before anything runs
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs={args.epochs} must be >= 1.")
    if args.time_budget_min is not None and not args.time_budget_min > 0:
        raise ConfigError(f"--time_budget_min={args.time_budget_min} must be a positive number of minutes.")
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out: the folder of the run to resume.")
    out = Path(args.out) if args.out else _default_out(args.dataset)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    config = dict(overrides)
    config.setdefault("checkpoint_dir", str(out / "saved"))
    if args.epochs is not None:
        config["epochs"] = args.epochs
    if args.time_budget_min is not None:
        config["time_budget"] = args.time_budget_min
    files = args.config_files.split() if args.config_files else []
    files = [str(Path(f).resolve()) for f in files]

    results: dict[str, dict] = {}
    for model in models:
        target = out / "runs" / f"{model}.json"
        if args.resume and target.is_file():
            results[model] = json.loads(target.read_text())
            print(f"{model}: kept from {target}", flush=True)
            continue
        spec = {"model": model, "dataset": args.dataset, "config_files": files, "config": config}
        result = {**run_in_subprocess(spec), "spec": spec}
        if "error" not in result:  # a failed model is retried by --resume
            atomic_write_bytes(target, (json.dumps(result, indent=2) + "\n").encode())
        results[model] = result
        print(_progress(model, result), flush=True)

    metrics, headline = _metrics(results)
    rows = [row_of(m, model_group(m), r, metrics) for m, r in results.items()]
    sized = [row for m, r in results.items() if "error" not in r for row in size_rows(m, r, metrics)]
    command = "python -m recbole_fmrl.benchmark " + " ".join(argv)
    table = markdown(rows, sized, metrics, args.dataset, command)
    atomic_write_bytes(out / "results.md", table.encode())
    _write_csv(out / "results.csv", rows + sized)
    summary = {"dataset": args.dataset, "command": command, "environment": environment(), "rows": rows}
    summary["sizes"] = sized
    atomic_write_bytes(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    plots(results, headline, out)
    print(table)
    print(f"results in {out}")
    failed = [m for m, r in results.items() if "error" in r]
    return 1 if failed and len(failed) == len(results) else 0


def _metrics(results: dict[str, dict]) -> tuple[list[str], str]:
    """The metric names the runs report (the dataset's metrics x topk), and the headline (valid_metric)."""
    metrics, headline = [], "ndcg@10"
    for r in results.values():
        if "error" not in r:
            metrics = list(r.get("test_result") or {})
            headline = str(
                r["spec"]["config"].get("valid_metric") or r.get("valid_metric") or headline
            ).lower()
            break
    if headline not in metrics and metrics:
        headline = metrics[0]
    return metrics, headline


def _progress(model: str, result: dict) -> str:
    if "error" in result:
        return f"{model}: failed: {result['error']}"
    test = result.get("test_result") or {}
    shown = "  ".join(f"{k}={float(v):.4f}" for k, v in list(test.items())[:3])
    return f"{model}: {shown}  ({result.get('epochs')} epochs, {result.get('train_seconds')} s)"


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def _default_out(dataset: str) -> Path:
    root = Path.cwd() / "benchmarks" / "runs"
    return root / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


main = cli_entry(_main)

if __name__ == "__main__":
    sys.exit(main())
