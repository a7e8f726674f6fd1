"""Strided-block top-k: the same k largest scores as torch.topk, ties and -inf included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbole_fmrl.evaluation import topk as topk_module
from recbole_fmrl.evaluation.topk import topk_indices


def _check(scores: torch.Tensor, k: int) -> None:
    got = topk_indices(scores, k)
    assert got.shape == (scores.size(0), k)
    assert all(len(set(row.tolist())) == k for row in got), "an item is picked twice"
    assert torch.equal(scores.gather(1, got), torch.topk(scores, k, dim=-1).values)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    n_items=st.integers(2, 700),
    k=st.integers(1, 12),
    levels=st.sampled_from([3, 50, 0]),
    n_inf=st.integers(0, 400),
    seed=st.integers(0, 2**16),
)
def test_block_topk_gives_torch_topks_values(rows, n_items, k, levels, n_inf, seed):
    """Every path (block, tail, fallback) on rows with many exact ties (few score levels) and masked items."""
    k = min(k, n_items)
    gen = torch.Generator().manual_seed(seed)
    if levels:
        scores = torch.randint(0, levels, (rows, n_items), generator=gen).float()
    else:
        scores = torch.randn(rows, n_items, generator=gen)
    scores[:, torch.randperm(n_items, generator=gen)[:n_inf]] = float("-inf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(topk_module, "_MIN_ITEMS", 0)  # take the block path on small catalogues too
        _check(scores, k)


def test_block_topk_on_a_large_catalogue_recurses_and_agrees():
    scores = torch.randn(3, 250_000, generator=torch.Generator().manual_seed(0))
    scores[:, ::7] = 0.0  # ties
    assert topk_module.block_width(250_000, 10) > 2 and 250_000 // topk_module.block_width(250_000, 10) > 2048
    _check(scores, 10)
    _check(scores, 1)


def test_block_topk_keeps_a_non_contiguous_view():
    base = torch.randn(4, 6000, generator=torch.Generator().manual_seed(1))
    _check(base[:, 1:5999], 10)
