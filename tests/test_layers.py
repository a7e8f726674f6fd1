"""Matryoshka invariants of the building blocks, as properties over random nestings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from recbole_fmrl.model.layers.lru import LRUEncoder, LRULayer
from recbole_fmrl.model.layers.matryoshka import (
    MatryoshkaLayerNorm,
    MatryoshkaLinear,
    MatryoshkaSizeError,
    check_sizes,
    iter_nested_scores,
    iter_size_scores,
    size_index,
)
from recbole_fmrl.model.layers.scan import packed_scan, parallel_scan, sequential_scan

nestings = st.lists(st.integers(1, 24), min_size=1, max_size=5, unique=True).map(sorted)
FAST = settings(max_examples=25, deadline=None)


def per_block_linear(layer: MatryoshkaLinear, x: torch.Tensor) -> torch.Tensor:
    """Reference: output block k as its own Linear over input[:in_sizes[k]]."""
    outs, start = [], 0
    for n_in, end in zip(layer.in_sizes, layer.out_sizes, strict=True):
        w = layer.weight[start:end, :n_in]
        b = layer.bias[start:end] if layer.bias is not None else None
        outs.append(F.linear(x[..., :n_in], w, b))
        start = end
    return torch.cat(outs, dim=-1)


@FAST
@given(sizes=nestings, seed=st.integers(0, 10_000))
def test_masked_linear_equals_per_block_loop(sizes, seed):
    torch.manual_seed(seed)
    layer = MatryoshkaLinear(sizes)
    x = torch.randn(3, 4, sizes[-1])
    torch.testing.assert_close(layer(x), per_block_linear(layer, x))


@FAST
@given(sizes=nestings, seed=st.integers(0, 10_000))
def test_masked_linear_jacobian_is_block_lower_triangular(sizes, seed):
    torch.manual_seed(seed)
    layer = MatryoshkaLinear(sizes)
    jac = torch.autograd.functional.jacobian(layer, torch.randn(sizes[-1]))
    assert torch.equal(jac != 0, (layer.mask != 0) & (jac != 0))
    assert (jac[layer.mask == 0] == 0).all()
    layer(torch.randn(5, sizes[-1])).sum().backward()
    assert (layer.weight.grad[layer.mask == 0] == 0).all()  # masked weights get no gradient
    assert (layer.weight[layer.mask == 0] == 0).all()  # and hold nothing


@FAST
@given(sizes=nestings, seed=st.integers(0, 10_000))
def test_nested_layer_norm_normalises_each_block(sizes, seed):
    torch.manual_seed(seed)
    norm = MatryoshkaLayerNorm(sizes)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, sizes[-1]) * 3 + 1
    expected, start = [], 0
    for end in sizes:
        expected.append(
            F.layer_norm(x[..., start:end], (end - start,), norm.weight[start:end], norm.bias[start:end])
        )
        start = end
    torch.testing.assert_close(norm(x), torch.cat(expected, dim=-1))


@FAST
@given(length=st.integers(1, 70), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_parallel_scan_equals_sequential(length, dim, seed):
    torch.manual_seed(seed)
    lam = torch.polar(torch.rand(dim) * 0.99, torch.rand(dim) * 6.28)
    b = torch.complex(torch.randn(2, length, dim), torch.randn(2, length, dim))
    torch.testing.assert_close(parallel_scan(lam, b), sequential_scan(lam, b), rtol=1e-4, atol=1e-5)


@FAST
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    dim=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_packed_scan_equals_padded_scan_with_gradients(lengths, dim, seed):
    """The CPU's scan over valid positions only: the padded scan's states and gradients (lam and b)."""
    torch.manual_seed(seed)
    width = max(max(lengths), 1)
    mask = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
    lam = torch.polar(torch.rand(dim) * 0.99, torch.rand(dim) * 6.28).requires_grad_()
    b = torch.complex(torch.randn(int(mask.sum()), dim), torch.randn(int(mask.sum()), dim)).requires_grad_()
    weight = torch.complex(torch.randn(int(mask.sum()), dim), torch.randn(int(mask.sum()), dim))

    def padded(lam, b):
        full = b.new_zeros(*mask.shape, dim)
        full[mask] = b
        return sequential_scan(lam, full)[mask]

    outs, grads = [], []
    for scan in (padded, lambda lam, b: packed_scan(lam, b, mask)):
        out = scan(lam, b)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).real.sum(), (lam, b)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_scan_gradients_pass_gradcheck():
    torch.manual_seed(0)
    mask = torch.arange(6) < torch.tensor([[3], [6], [0], [1]])
    lam = torch.polar(torch.rand(3, dtype=torch.float64) * 0.9, torch.rand(3, dtype=torch.float64) * 6)
    b = torch.randn(int(mask.sum()), 3, dtype=torch.complex128)
    assert torch.autograd.gradcheck(
        lambda lam, b: packed_scan(lam, b, mask), (lam.requires_grad_(), b.requires_grad_())
    )


def test_packed_scan_rejects_a_mask_with_gaps():
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="right-padded"):
        packed_scan(torch.ones(2, dtype=torch.complex64), torch.zeros(2, 2, dtype=torch.complex64), mask)


def test_encoder_ignores_right_padding_content():
    torch.manual_seed(0)
    encoder = LRUEncoder([4, 8], 2, dropout=0.0, attn_dropout=0.0, r_min=0.0, r_max=0.5).eval()
    x = torch.randn(2, 9, 8)
    mask = torch.tensor([[True] * 5 + [False] * 4, [True] * 9])
    noisy = x.clone()
    noisy[0, 5:] = torch.randn(4, 8) * 100
    out, out_noisy = encoder(x, mask), encoder(noisy, mask)
    torch.testing.assert_close(out, out_noisy)
    assert not out[0, 5:].any()  # padded positions are never encoded


def test_packed_encoding_equals_padded_per_sequence_encoding():
    """Packing B sequences of different lengths gives each one's own unpadded encoding."""
    torch.manual_seed(1)
    encoder = LRUEncoder([4, 8], 2, dropout=0.0, attn_dropout=0.0, r_min=0.0, r_max=0.9).eval()
    lengths = [3, 7, 1]
    x = torch.randn(3, 7, 8)
    mask = torch.arange(7) < torch.tensor(lengths).unsqueeze(1)
    out = encoder(x, mask)
    for row, n in enumerate(lengths):
        alone = encoder(x[row : row + 1, :n], torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(out[row, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_last_position_on_padding_is_a_clear_error():
    encoder = LRUEncoder([4, 8], 1, dropout=0.0, attn_dropout=0.0, r_min=0.0, r_max=0.5).eval()
    mask = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="last position .* is padding"):
        encoder(torch.randn(1, 3, 8), mask, torch.tensor([2]))


@FAST
@given(sizes=nestings, seed=st.integers(0, 10_000))
def test_lru_layer_prefix_depends_only_on_input_prefix(sizes, seed):
    torch.manual_seed(seed)
    layer = LRULayer(sizes, dropout=0.0).eval()
    x = torch.randn(2, 6, sizes[-1])
    mask = torch.ones(2, 6, dtype=torch.bool)
    for m in sizes:
        changed = x.clone()
        changed[..., m:] = torch.randn_like(changed[..., m:])
        packed, packed_changed = x.flatten(0, 1), changed.flatten(0, 1)
        torch.testing.assert_close(layer(packed, mask)[..., :m], layer(packed_changed, mask)[..., :m])


@FAST
@given(sizes=nestings, seed=st.integers(0, 10_000))
def test_nested_scores_equal_per_size_products(sizes, seed):
    """Evaluation scores are each size's standalone product bit for bit; the fused training sum is close."""
    torch.manual_seed(seed)
    q, items = torch.randn(3, sizes[-1]), torch.randn(7, sizes[-1])
    scores = torch.stack(list(iter_size_scores(q, items, sizes)))
    for k, (m, fused) in enumerate(zip(sizes, iter_nested_scores(q, items, sizes), strict=True)):
        assert torch.equal(scores[k], q[:, :m] @ items[:, :m].T)
        torch.testing.assert_close(fused, scores[k], rtol=1e-4, atol=1e-4)
    buffers = set()
    for k, reused in enumerate(iter_size_scores(q, items, sizes, reuse=True)):
        assert torch.equal(reused, scores[k])  # each size, while it is the current one
        buffers.add(reused.data_ptr())
    assert len(buffers) == 1


@pytest.mark.parametrize(
    "sizes, hidden, match",
    [
        ([8, 8, 16], 16, "strictly increasing"),
        ([16, 8], 16, "strictly increasing"),
        ([0, 8], 8, "<= 0"),
        ([-4, 8], 8, "<= 0"),
        ([8, 16], 32, "must equal hidden_size"),
        ([], 8, "empty"),
    ],
)
def test_bad_sizes_are_rejected(sizes, hidden, match):
    with pytest.raises(MatryoshkaSizeError, match=match):
        check_sizes(sizes, hidden)


def test_eval_size_must_be_a_nesting_size():
    assert size_index([8, 16, 32], None) == 2
    assert size_index([8, 16, 32], 16) == 1
    with pytest.raises(MatryoshkaSizeError, match="eval_size=12 is not one of"):
        size_index([8, 16, 32], 12)


@FAST
@given(
    sizes=nestings,
    seed=st.integers(0, 10_000),
    n_layers=st.integers(1, 3),
    length=st.integers(1, 40),
    r_max=st.sampled_from([0.1, 0.9, 0.999]),
)
def test_encoder_state_at_last_positions_equals_gathered_full_pass(sizes, seed, n_layers, length, r_max):
    """Inference's shortcut (weighted sum for the state, position-wise maps on B rows) = the full scan."""
    torch.manual_seed(seed)
    blocks = dict(dropout=0.0, attn_dropout=0.0, r_min=0.0, r_max=r_max)
    encoder = LRUEncoder(sizes, n_layers, **blocks).eval()
    lengths = torch.randint(1, length + 1, (5,))
    mask = torch.arange(length) < lengths.unsqueeze(1)  # right padding, as RecBole's
    x = torch.randn(5, length, sizes[-1]) * mask.unsqueeze(-1)
    last = torch.stack([torch.randint(0, int(n), ()) for n in lengths])  # any position, not only the end
    full = encoder(x, mask)
    torch.testing.assert_close(encoder(x, mask, last), full[torch.arange(5), last], rtol=1e-4, atol=1e-4)
