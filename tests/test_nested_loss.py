"""The fused, chunked nested cross-entropy equals the reference (K logit matrices through autograd)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbole_fmrl.config import Config
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.layers import nested_loss
from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError
from recbole_fmrl.model.layers.nested_loss import (
    CHUNK_BYTES,
    ITEM_TILE,
    NARROW_COLUMNS,
    SUB_ROWS,
    auto_chunk_size,
    nested_cross_entropy,
    nested_cross_entropy_reference,
)


@st.composite
def problems(draw):
    n_sizes = draw(st.integers(1, 5))
    sizes = sorted(draw(st.sets(st.integers(1, 24), min_size=n_sizes, max_size=n_sizes)))
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n_sizes, max_size=n_sizes))
    if sum(weights) == 0:
        weights[-1] = 1.0
    rows = draw(st.integers(1, 40))
    n_items = draw(st.integers(2, 30))
    chunk = draw(st.sampled_from([None, 1, 3, 7, 64]))
    # Blocks narrower than this take the narrow path: 1 = none, 25 = every block (sizes here are <= 24).
    narrow = draw(st.sampled_from([1, 8, NARROW_COLUMNS, 25]))
    # Rows per sub-chunk (0 = whole chunks, as on a GPU), and the leading blocks up to this many columns take
    # their GEMMs on those rows: 0 = none (all on whole chunks), 24 = all.
    sub = draw(st.tuples(st.sampled_from([0, 4, 12, 24]), st.sampled_from([0, 1, 3, SUB_ROWS])))
    # The other blocks at least this many columns wide take their forward this many items at a time: 0 or
    # at least the number of items = one GEMM.
    tile = draw(st.tuples(st.sampled_from([1, 4, 25]), st.sampled_from([0, 1, 4, ITEM_TILE])))
    seed = draw(st.integers(0, 10_000))
    return sizes, torch.tensor(weights) / sum(weights), rows, n_items, chunk, narrow, sub, tile, seed


def _loss_and_grads(fn, query, items, targets, sizes, weights, **kwargs):
    q, e = query.clone().requires_grad_(), items.clone().requires_grad_()
    loss = fn(q, e, targets, sizes, weights, **kwargs)
    loss.backward()
    return loss.detach(), q.grad, e.grad


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fused_loss_and_gradients_equal_the_reference(problem):
    sizes, weights, rows, n_items, chunk, narrow, (sub_columns, sub_rows), (tile_columns, tile), seed = (
        problem
    )
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, sizes[-1], generator=gen)
    items = torch.randn(n_items, sizes[-1], generator=gen)
    targets = torch.randint(0, n_items, (rows,), generator=gen)
    ref = _loss_and_grads(nested_cross_entropy_reference, query, items, targets, sizes, weights)
    with (
        mock.patch.object(nested_loss, "NARROW_COLUMNS", narrow),
        mock.patch.object(nested_loss, "SUB_COLUMNS", sub_columns),
        mock.patch.object(nested_loss, "SUB_ROWS", sub_rows),
        mock.patch.object(nested_loss, "TILE_COLUMNS", tile_columns),
        mock.patch.object(nested_loss, "ITEM_TILE", tile),
    ):
        fused = _loss_and_grads(nested_cross_entropy, query, items, targets, sizes, weights, chunk_size=chunk)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_scales_with_the_upstream_gradient_and_flows_to_one_input():
    torch.manual_seed(0)
    query, items = torch.randn(5, 8), torch.randn(9, 8, requires_grad=True)
    targets, weights = torch.randint(0, 9, (5,)), torch.tensor([0.5, 0.5])
    (3 * nested_cross_entropy(query, items, targets, [4, 8], weights)).backward()
    fused = items.grad.clone()
    items.grad = None
    (3 * nested_cross_entropy_reference(query, items, targets, [4, 8], weights)).backward()
    torch.testing.assert_close(fused, items.grad)


def test_target_with_underflowing_probability_stays_finite_and_exact():
    """A target 200 logits below the best has probability 0 in float32: its loss comes from the best's."""
    query = torch.tensor([[10.0, 10.0], [1.0, 0.0]])
    items = torch.tensor([[10.0, 10.0], [-10.0, 0.0], [0.5, 0.5]])
    targets, weights = torch.tensor([1, 2]), torch.tensor([0.25, 0.75])
    fused = nested_cross_entropy(query, items, targets, [1, 2], weights)
    ref = nested_cross_entropy_reference(query, items, targets, [1, 2], weights)
    assert torch.isfinite(fused) and fused.item() > 50
    torch.testing.assert_close(fused, ref)


def test_rows_that_mostly_underflow_match_the_reference_in_every_chunk():
    """Wide random scores (an untrained D=1024 model's): most targets' probabilities are 0 in float32."""
    torch.manual_seed(0)
    query = (4 * torch.randn(50, 64)).requires_grad_()
    items = (4 * torch.randn(300, 64)).requires_grad_()
    targets, sizes, weights = torch.randint(0, 300, (50,)), [8, 16, 64], torch.tensor([0.2, 0.3, 0.5])
    with torch.no_grad():
        probs = torch.softmax(query @ items.T, dim=1)
    assert (probs[torch.arange(50), targets] < 1e-30).float().mean() > 0.5
    fused = nested_cross_entropy(query, items, targets, sizes, weights, chunk_size=7)
    fused.backward()
    grads = query.grad.clone(), items.grad.clone()
    query.grad = items.grad = None
    ref = nested_cross_entropy_reference(query, items, targets, sizes, weights)
    ref.backward()
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(grads, (query.grad, items.grad))


def test_scratch_is_bounded_whatever_the_number_of_sizes_or_rows():
    for n_items in (100, 12_101, 100_000):
        for n_sizes in (1, 6, 8):
            rows = auto_chunk_size(n_items, n_sizes)
            assert rows >= 16
            assert rows == 16 or (n_sizes + 1) * rows * n_items * 4 <= CHUNK_BYTES


def test_bad_shapes_and_chunk_sizes_are_clear_errors():
    q, e, t, w = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2]), torch.tensor([0.5, 0.5])
    with pytest.raises(MatryoshkaSizeError, match="must end at the width 8"):
        nested_cross_entropy(q, e, t, [4, 6], w)
    with pytest.raises(MatryoshkaSizeError, match="loss_chunk_size=0"):
        nested_cross_entropy(q, e, t, [4, 8], w, chunk_size=0)
    with pytest.raises(ValueError, match=r"must be \[P, D\] and \[N, D\]"):
        nested_cross_entropy(q, torch.randn(5, 4), t, [4, 8], w)


def test_model_rejects_a_bad_loss_chunk_size():
    with pytest.raises(ConfigError, match="loss_chunk_size=0 must be a whole number >= 1"):
        Config("fMRLRec", "mm-sample", config_dict={"state": "WARNING", "loss_chunk_size": 0}, cli_args=[])


@pytest.mark.parametrize("train_mode", ["all_positions", "prefix"])
def test_model_default_loss_equals_the_reference_loss(train_mode, monkeypatch):
    """fMRLRec trains with the fused loss by default; swapping in the reference changes nothing but rounding."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_fmrl.model.sequential_recommender import fmrlrec

    extra = {"modalities": [], "use_id_embedding": True, "hidden_size": 16, "mrl_sizes": [4, 8, 16]}
    config = Config(
        "fMRLRec",
        "mm-sample",
        config_dict={"state": "WARNING", "train_mode": train_mode, "loss_chunk_size": 5, **extra},
        cli_args=[],
    )
    train, *_ = data_preparation(config, create_dataset(config))
    init_seed(0, True)
    model = fmrlrec.fMRLRec(config, train._dataset).eval()  # no dropout: both passes see the same network
    batch = next(iter(train))

    def loss_and_grads():
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fused, fused_grads = loss_and_grads()
    monkeypatch.setattr(
        fmrlrec,
        "nested_cross_entropy",
        lambda q, e, t, s, w, _chunk: nested_cross_entropy_reference(q, e, t, s, w),
    )
    ref, ref_grads = loss_and_grads()
    torch.testing.assert_close(fused, ref)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_second_backward_is_a_clear_error():
    q = torch.randn(4, 8, requires_grad=True)
    loss = nested_cross_entropy(
        q, torch.randn(6, 8), torch.tensor([0, 1, 2, 3]), [4, 8], torch.tensor([0.5, 0.5])
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="supports one backward pass"):
        loss.backward()


@pytest.mark.parametrize(
    ("transpose_bytes", "transpose_rows", "sub_columns", "copied"),
    [
        (4000, 7, 16, True),
        (0, nested_loss.TRANSPOSE_ROWS, 16, False),
        (0, nested_loss.TRANSPOSE_ROWS, 0, False),
    ],
)
def test_large_item_matrices_skip_the_transposed_copy_and_match_the_reference(
    monkeypatch, transpose_bytes, transpose_rows, sub_columns, copied
):
    # The item matrix (50 x 24 floats, 4,800 bytes) counts as large; its leading blocks' columns (16 of them,
    # 3,200 bytes) are then copied transposed, transpose_rows items at a time, when that copy is within
    # TRANSPOSE_BYTES, and not at all when it is not (it would be a second item matrix) or without row
    # sub-chunks.
    monkeypatch.setattr(nested_loss, "TRANSPOSE_BYTES", transpose_bytes)
    monkeypatch.setattr(nested_loss, "TRANSPOSE_ROWS", transpose_rows)
    monkeypatch.setattr(nested_loss, "SUB_COLUMNS", sub_columns)
    calls = []
    transposed = nested_loss._transposed
    monkeypatch.setattr(nested_loss, "_transposed", lambda x: calls.append(x.shape) or transposed(x))
    torch.manual_seed(1)
    query, items = torch.randn(20, 24, requires_grad=True), torch.randn(50, 24, requires_grad=True)
    targets, sizes, weights = torch.randint(0, 50, (20,)), [8, 16, 24], torch.tensor([0.2, 0.3, 0.5])
    nested_cross_entropy(query, items, targets, sizes, weights, chunk_size=6).backward()
    assert calls == ([(50, 16)] if copied else [])
    grads = query.grad.clone(), items.grad.clone()
    query.grad = items.grad = None
    nested_cross_entropy_reference(query, items, targets, sizes, weights).backward()
    torch.testing.assert_close(grads, (query.grad, items.grad))
