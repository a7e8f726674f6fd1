"""Top-k over a catalogue by strided blocks: the same k largest scores as ``torch.topk``, faster on CPU.

The all-sizes evaluator takes one top-k per nesting size, and on CPU ``torch.topk``'s per-row selection
costs as much as a size's score GEMM. Split each row's items into ``n`` strided blocks (item ``a*n + j`` in
block ``j``); the k largest scores lie in the k blocks with the largest maxima (any other block's maximum is
topped by k distinct scores from those blocks). A vectorised max over the row, one small top-k over the
block maxima and one over the k chosen blocks' items replace the selection over the whole row
(``benchmarks.run --only eval_sizes`` times both on a Beauty batch).

The values equal ``torch.topk``'s exactly (the same floats, sorted); among exactly tied scores which item
is picked is unspecified, as it is for ``torch.topk`` itself.
"""

from __future__ import annotations

import math

import torch

# Below this many items per row (or when a row has too few blocks) torch.topk is as fast.
_MIN_ITEMS = 2048


def block_width(n_items: int, k: int) -> int:
    """Items per strided block: balances the top-k over block maxima (n_items / w) against the candidates
    (w * k); a third of the balance point was fastest in a micro-benchmark on CPU (gathering strided
    candidates costs more than selecting among block maxima)."""
    return max(2, round(math.sqrt(n_items / k) / 3))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[rows, k]`` of each row's k largest scores, in descending order of score."""
    rows, n_items = scores.shape
    width = block_width(n_items, k) if k >= 1 else 1
    n_blocks = n_items // width
    if scores.device.type != "cpu" or n_items < _MIN_ITEMS or k < 1 or n_blocks < 4 * k:
        return torch.topk(scores, k, dim=-1).indices
    main = scores[:, : width * n_blocks].unflatten(1, (width, n_blocks))  # item a*n + j at [a, j]
    blocks = topk_indices(main.amax(dim=1), k)  # [rows, k]; recursive on very large catalogues
    candidates = torch.take_along_dim(main, blocks.unsqueeze(1), dim=2).reshape(rows, -1)
    items = torch.arange(width, device=scores.device).view(1, width, 1) * n_blocks + blocks.unsqueeze(1)
    items = items.reshape(rows, -1)
    if width * n_blocks < n_items:  # the last few items, always candidates
        candidates = torch.cat((candidates, scores[:, width * n_blocks :]), dim=1)
        tail = torch.arange(width * n_blocks, n_items, device=scores.device).expand(rows, -1)
        items = torch.cat((items, tail), dim=1)
    return items.gather(1, candidates.topk(k, dim=-1).indices)
