"""Evaluate a nested model at every Matryoshka size in one pass, through RecBole's Collector/Evaluator.

Each size gets its own copy of the trainer's Collector (so metrics that need training-data statistics work)
and the same post-processing RecBole's ``Trainer._full_sort_batch_eval`` applies: padding item and, where the
data loader gives one, the user's history set to -inf before top-k. What does not depend on the size (the
batch's ground truth) is built once per batch, so each extra size costs one score slice and one top-k.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader

from recbole_fmrl.data.atomic import atomic_write_lines
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.evaluation.export import (
    checkpoint_size_bytes,
    export_submodel,
    parameter_counts,
    speaks_matryoshka,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_all_sizes(trainer, eval_data, model=None) -> OrderedDict[int, OrderedDict]:
    """``{size: RecBole result dict}`` for every size of ``model`` (default: the trainer's), one data pass."""
    model = trainer.model if model is None else model
    if not speaks_matryoshka(model):
        raise TypeError(
            f"{type(model).__name__} does not speak the Matryoshka protocol (mrl_sizes, "
            "full_sort_predict_sizes)."
        )
    if not isinstance(eval_data, FullSortEvalDataLoader):
        raise ConfigError("Matryoshka evaluation needs full ranking: set eval_args mode to 'full'.")
    model.eval()
    n_items = eval_data._dataset.item_num
    collectors = [_SizeCollector(trainer.eval_collector) for _ in model.mrl_sizes]
    predict_sizes = getattr(model, "iter_full_sort_predict_sizes", model.full_sort_predict_sizes)
    for interaction, history_index, positive_u, positive_i in eval_data:
        interaction = interaction.to(trainer.device)
        positives = None
        for scores, collector in zip(predict_sizes(interaction), collectors, strict=True):
            scores = scores.reshape(-1, n_items)
            scores[:, 0] = -np.inf
            if history_index is not None:
                scores[history_index] = -np.inf
            if positives is None:
                positives = _Positives(positive_u, positive_i, scores.shape, scores.device)
            collector.collect(scores, interaction, positive_u, positive_i, positives)
    results = OrderedDict()
    for size, collector in zip(model.mrl_sizes, collectors, strict=True):
        results[size] = trainer.evaluator.evaluate(collector.finish(model))
    return results


class _Positives:
    """A batch's ground truth, built once and shared by every size.

    RecBole's Collector builds a dense ``[users, items]`` 0/1 matrix per call to look up its top-k hits; at
    Beauty scale that costs 7x the top-k itself, and it would be paid once per size. Sorted ``user*items+item``
    keys give the same hits and lengths by binary search.
    """

    def __init__(self, positive_u, positive_i, shape, device):
        n_users, self.n_items = shape
        keys = positive_u.to(device).long() * self.n_items + positive_i.to(device).long()
        self.keys = torch.unique(keys)  # sorted; duplicates count once, as in RecBole's 0/1 matrix
        self.lengths = torch.bincount(self.keys // self.n_items, minlength=n_users).unsqueeze(1)

    def hits(self, topk_idx: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(topk_idx.size(0), device=topk_idx.device).unsqueeze(1)
        query = rows * self.n_items + topk_idx
        if self.keys.numel() == 0:
            return torch.zeros_like(query)
        at = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return (self.keys[at] == query).long()


class _SizeCollector:
    """One size's copy of the trainer's RecBole Collector, with the top-k bookkeeping shared across sizes.

    ``rec.topk`` / ``rec.items`` (every top-k metric) are filled here from one ``topk`` per size and the
    batch's shared positives, in exactly the layout RecBole's Collector writes; anything else a metric needs
    (``rec.meanrank``, ``rec.score``, labels) goes through RecBole's own ``eval_batch_collect``.
    """

    _SHARED = ("rec.topk", "rec.items")

    def __init__(self, template):
        self.collector = copy.deepcopy(template)
        register = self.collector.register
        self.need_topk = bool(register.need("rec.topk"))
        self.need_items = bool(register.need("rec.items"))
        self.k = max(self.collector.topk)
        self.delegate = None
        rest = copy.copy(register)
        for key in self._SHARED:
            setattr(rest, key, False)
        if any(rest.need(key) for key in ("rec.meanrank", "rec.score", "data.label")):
            self.delegate = copy.copy(self.collector)  # shares data_struct: writes land in one place
            self.delegate.register = rest

    def collect(self, scores, interaction, positive_u, positive_i, positives: _Positives) -> None:
        data = self.collector.data_struct
        if self.need_topk or self.need_items:
            topk_idx = torch.topk(scores, self.k, dim=-1).indices
            if self.need_items:
                data.update_tensor("rec.items", topk_idx)
            if self.need_topk:
                data.update_tensor(
                    "rec.topk", torch.cat((positives.hits(topk_idx), positives.lengths), dim=1)
                )
        if self.delegate is not None:
            self.delegate.eval_batch_collect(scores, interaction, positive_u, positive_i)

    def finish(self, model):
        self.collector.model_collect(model)
        return self.collector.get_data_struct()


@torch.no_grad()
def size_costs(model, eval_data, device, n_batches: int = 5, repeats: int = 3) -> OrderedDict[int, dict]:
    """Per size: parameters of the exported sub-model, its state size, and scoring latency per user batch."""
    batches = []
    for i, (interaction, *_rest) in enumerate(eval_data):
        if i >= n_batches:
            break
        batches.append(interaction.to(device))
    costs = OrderedDict()
    for size in model.mrl_sizes:
        sub = export_submodel(model, size).eval()
        sub.full_sort_predict(batches[0])  # warm-up
        timings = []
        for _ in range(repeats):
            for batch in batches:
                start = time.perf_counter()
                sub.full_sort_predict(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
        params = parameter_counts(sub)
        costs[size] = {
            "params_encoder": params["encoder"],
            "params_item_tower": params["item_tower"],
            "state_bytes": checkpoint_size_bytes(sub),
            "latency_ms_per_batch": 1000 * float(np.median(timings)),
            "batch_users": int(len(batches[0])),
        }
    return costs


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


def write_report(by_size: dict, costs: dict | None, stem: str | Path, dataset: str, model: str) -> dict:
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
        f"{stem}.json", [json.dumps({"dataset": dataset, "model": model, "by_size": records}, indent=2)]
    )

    sizes = list(by_size)
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in next(iter(by_size.values())):
        ax.plot(sizes, [float(by_size[s][metric]) for s in sizes], marker="o", label=metric)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("embedding size")
    ax.set_ylabel("test metric")
    ax.set_title(f"{model} on {dataset}: one model, every size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = stem.with_name(f".{stem.name}.png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, f"{stem}.png")
    return {"csv": f"{stem}.csv", "json": f"{stem}.json", "png": f"{stem}.png"}
