"""Evaluate a nested model at every Matryoshka size in one pass, through RecBole's Collector/Evaluator.

Each size gets its own copy of the trainer's Collector (so metrics that need training-data statistics work)
and the same post-processing RecBole's ``Trainer._full_sort_batch_eval`` applies: padding item and, where the
data loader gives one, the user's history set to -inf before top-k. What does not depend on the size (the
batch's ground truth) is built once per batch, so each extra size costs its scores and one top-k (by strided
blocks, ``topk.py``: the same k largest scores as ``torch.topk``, faster on CPU).

``mrl_eval_scoring: fused`` (default) builds the scores as the fused loss does: size k's are size k-1's plus
one block's partial product, in place, for a chunk of users small enough to stay in a CPU core's cache
across the sizes, with the -inf masks set once. All sizes then cost about one full-size GEMM. ``exact``
computes each size's own GEMM, ``q[:, :m] @ E[:, :m].T``, as its export does (about twice the GEMM work for
doubling sizes). The two sum in another order, equal up to float rounding; a last-bit difference can swap two
near-tied items in a top-k. Metrics that need every score (``rec.score``, ``rec.meanrank``, labels) take the
exact path.
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

# Scores of one chunk of users, kept in a core's cache while every size adds its block (2 MiB: 43 users of
# Beauty's 12,102 items). benchmarks.run --only eval_sizes times the evaluation with it against exact scoring.
CHUNK_BYTES = 2 * 2**20


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
    fused = (trainer.config["mrl_eval_scoring"] or "fused") == "fused"
    fused = fused and not any(c.delegate is not None for c in collectors)
    for interaction, history_index, positive_u, positive_i in eval_data:
        interaction = interaction.to(trainer.device)
        if fused:
            query, items = model.score_operands(interaction)
            positives = _Positives(positive_u, positive_i, (query.size(0), n_items), query.device)
            chunks = [[] for _ in collectors]  # each size's top-k, chunk by chunk in row order
            for k, _, scores in fused_size_scores(query, items, model.mrl_sizes, history_index):
                if collectors[k].wants_topk:
                    chunks[k].append(topk_indices(scores, collectors[k].k))
            for collector, parts in zip(collectors, chunks, strict=True):
                if parts:  # one update per batch: RecBole's Collector concatenates on every call
                    collector.add_topk(torch.cat(parts), positives)
            continue
        positives = None
        sizes = model.iter_full_sort_predict_sizes(interaction, reuse=True)
        for scores, collector in zip(sizes, collectors, strict=True):
            scores = scores.reshape(-1, n_items)
            _mask(scores, history_index)
            if positives is None:
                positives = _Positives(positive_u, positive_i, scores.shape, scores.device)
            collector.collect(scores, interaction, positive_u, positive_i, positives)
    results = OrderedDict()
    for size, collector in zip(model.mrl_sizes, collectors, strict=True):
        results[size] = trainer.evaluator.evaluate(collector.finish(model))
    return results


def _mask(scores: torch.Tensor, history_index, row_offset: int = 0) -> None:
    """RecBole's full-sort post-processing: the padding item and the users' history items get -inf."""
    scores[:, 0] = -np.inf
    if history_index is not None:
        rows, items = history_index
        scores[rows.to(scores.device) - row_offset, items.to(scores.device)] = -np.inf


def fused_size_scores(query: torch.Tensor, items: torch.Tensor, sizes, history_index=None, chunk_rows=None):
    """Yield ``(k, first_row, scores)``: size k's masked scores ``[rows, n_items]`` of a chunk of users.

    Every size of a chunk is yielded before the next chunk, and one buffer is reused: each yield is valid
    until the next is asked for. Size k's scores are size k-1's plus ``query[:, a:b] @ items[:, a:b].T``
    for its block, added in place, so the -inf masks set before the first block stay (-inf + x = -inf).
    """
    n_rows, n_items = query.size(0), items.size(0)
    if chunk_rows is None:
        on_cpu = query.device.type == "cpu"
        chunk_rows = max(8, CHUNK_BYTES // (4 * max(1, n_items))) if on_cpu else n_rows
    chunk_rows = max(1, min(int(chunk_rows), n_rows))
    blocks = list(zip([0, *sizes[:-1]], sizes, strict=True))
    # Contiguous blocks: BLAS multiplies a narrow column slice of a wide matrix several times slower.
    query_blocks = [query[:, a:b].contiguous() for a, b in blocks]
    item_blocks = [items[:, a:b].T.contiguous() for a, b in blocks]
    if history_index is not None:  # each chunk's history pairs, from the rows sorted once
        rows, hist_items = (t.to(query.device) for t in history_index)
        order = torch.argsort(rows, stable=True)
        rows, hist_items = rows[order], hist_items[order]
    buffer = query.new_empty(chunk_rows, n_items)
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(n_rows, r0 + chunk_rows)
        scores = buffer[: r1 - r0]
        for k, (q, e) in enumerate(zip(query_blocks, item_blocks, strict=True)):
            if k == 0:
                torch.mm(q[r0:r1], e, out=scores)
                chunk_history = None
                if history_index is not None:
                    lo, hi = torch.searchsorted(rows, rows.new_tensor([r0, r1])).tolist()
                    chunk_history = (rows[lo:hi], hist_items[lo:hi])
                _mask(scores, chunk_history, r0)
            else:
                scores.addmm_(q[r0:r1], e)
            yield k, r0, scores


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

    @property
    def wants_topk(self) -> bool:
        return self.need_topk or self.need_items

    def collect(self, scores, interaction, positive_u, positive_i, positives: _Positives) -> None:
        if self.wants_topk:
            self.add_topk(topk_indices(scores, self.k), positives)
        if self.delegate is not None:
            self.delegate.eval_batch_collect(scores, interaction, positive_u, positive_i)

    def add_topk(self, topk_idx: torch.Tensor, positives: _Positives) -> None:
        """A whole batch's top-k item indices ``[users, k]``, in RecBole's ``rec.items``/``rec.topk`` layout."""
        data = self.collector.data_struct
        if self.need_items:
            data.update_tensor("rec.items", topk_idx)
        if self.need_topk:
            data.update_tensor("rec.topk", torch.cat((positives.hits(topk_idx), positives.lengths), dim=1))

    def finish(self, model):
        self.collector.model_collect(model)
        return self.collector.get_data_struct()
