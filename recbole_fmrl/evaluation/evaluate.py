"""Evaluate a nested model at every Matryoshka size in one pass, through RecBole's Collector/Evaluator.

Each size gets its own copy of the trainer's Collector (so metrics that need training-data statistics work)
and the same post-processing RecBole's ``Trainer._full_sort_batch_eval`` applies: padding item and, where the
data loader gives one, the user's history set to -inf before top-k. What does not depend on the size (the
batch's ground truth) is built once per batch, so each extra size costs one score slice and one top-k (by
strided blocks, ``topk.py``: the same k largest scores as ``torch.topk``, faster on CPU).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.evaluation.topk import topk_indices
from recbole_fmrl.model.abstract_recommender import speaks_matryoshka


@torch.no_grad()
def evaluate_all_sizes(trainer, eval_data, model=None) -> OrderedDict[int, OrderedDict]:
    """``{size: RecBole result dict}`` for every size of ``model`` (default: the trainer's), one data pass."""
    model = trainer.model if model is None else model
    if not speaks_matryoshka(model):
        raise ConfigError(
            f"{type(model).__name__} is not a nested (Matryoshka) model; evaluate it with RecBole."
        )
    if not isinstance(eval_data, FullSortEvalDataLoader):
        raise ConfigError("Matryoshka evaluation needs full ranking: set eval_args mode to 'full'.")
    model.eval()
    n_items = eval_data._dataset.item_num
    collectors = [_SizeCollector(trainer.eval_collector) for _ in model.mrl_sizes]
    predict_sizes = model.iter_full_sort_predict_sizes
    for interaction, history_index, positive_u, positive_i in eval_data:
        interaction = interaction.to(trainer.device)
        positives = None
        for scores, collector in zip(predict_sizes(interaction, reuse=True), collectors, strict=True):
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
            topk_idx = topk_indices(scores, self.k)
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
