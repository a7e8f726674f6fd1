"""The size x metric report: a log table and ``<stem>.{csv,json,png}`` files, each written atomically."""

from __future__ import annotations

import json
from logging import getLogger
from pathlib import Path

from recbole.utils import set_color

from recbole_fmrl.evaluation.costs import size_costs
from recbole_fmrl.evaluation.evaluate import evaluate_all_sizes
from recbole_fmrl.fileio import atomic_write, atomic_write_lines


def report_all_sizes(config, trainer, data, split: str = "test") -> dict:
    """``split``'s metrics at every nesting size (one pass), logged and written beside the checkpoint as
    ``<checkpoint>-<split>-sizes.*``. The test report also times each size; the valid one, which serves
    to choose a size without looking at the test set, does not (the cost does not depend on the split)."""
    logger = getLogger()
    by_size = evaluate_all_sizes(trainer, data)
    costs = size_costs(trainer.model, data, config["device"]) if split == "test" else None
    logger.info(set_color(f"{split} result by size", "yellow") + ":\n" + format_table(by_size, costs))
    stem = Path(config["checkpoint_dir"]) / f"{Path(trainer.saved_model_file).stem}-{split}-sizes"
    files = write_report(by_size, costs, stem, config["dataset"], config["model"], split)
    logger.info(f"per-size results written to {files['csv']}, .json and .png")
    return by_size


def format_table(by_size: dict, costs: dict | None = None) -> str:
    metrics = list(next(iter(by_size.values())))
    extra = ["params_encoder", "params_item_tower", "latency_ms_per_batch"] if costs else []
    header = ["size", *metrics, *extra]
    rows = []
    for size, result in by_size.items():
        row = [str(size), *(f"{float(result[m]):.4f}" for m in metrics)]
        if costs:
            c = costs[size]
            row += [str(c["params_encoder"]), str(c["params_item_tower"]), f"{c['latency_ms_per_batch']:.2f}"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])


def write_report(
    by_size: dict, costs: dict | None, stem: str | Path, dataset: str, model: str, split: str = "test"
) -> dict:
    """``<stem>.{csv,json,png}``, each written atomically; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {"size": size, **{k: float(v) for k, v in result.items()}, **(costs[size] if costs else {})}
        for size, result in by_size.items()
    ]
    keys = list(records[0])
    atomic_write_lines(
        f"{stem}.csv", [",".join(keys) + "\n", *(",".join(str(r[k]) for k in keys) + "\n" for r in records)]
    )
    atomic_write_lines(
        f"{stem}.json",
        [json.dumps({"dataset": dataset, "model": model, "split": split, "by_size": records}, indent=2)],
    )

    sizes = list(by_size)
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in next(iter(by_size.values())):
        ax.plot(sizes, [float(by_size[s][metric]) for s in sizes], marker="o", label=metric)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("embedding size")
    ax.set_ylabel(f"{split} metric")
    ax.set_title(f"{model} on {dataset}: one model, every size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(f"{stem}.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return {"csv": f"{stem}.csv", "json": f"{stem}.json", "png": f"{stem}.png"}
