"""Cross-entropy over all items at every nesting size at once, fused and chunked over rows.

The reference (``nested_cross_entropy_reference``) materialises one ``[rows, items]`` logit matrix per size
and lets autograd keep them all, with a full-size zero gradient for each size's slice of the item matrix.
``nested_cross_entropy`` computes the same loss and gradients one chunk of rows at a time: the scores of
size k are size k-1's plus one block's partial product, and the gradient of block j is
``H_j = sum_{k >= j} w_k (softmax_k - onehot)`` times that block of the other operand, so every logit GEMM
is done once (forward, d-query and d-items: three full-size GEMMs in all) and no K-fold logit tensor lives
past its chunk. On a CPU each chunk's softmaxes are taken a few rows at a time, and those rows' sums H_k are
built right after, in place of the softmaxes, while they are still in cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError, iter_nested_scores

CHUNK_BYTES = 128 * 2**20  # scratch of the fused loss: (K + 1) buffers of [chunk, items] at most
MIN_CHUNK, MAX_CHUNK = 16, 1024
# Item matrices up to this size are transposed once for faster forward GEMMs. Above it the copy costs more
# than it saves: at D=1024 on 12,101 items (50 MB) the step was as fast or faster without it (interleaved
# 2-thread comparisons; the benchmark's own runs do not separate the two). A larger matrix still gets its
# leading blocks' columns copied transposed when that copy is within this size (12 MB at D=1024 on 12,101
# items); above it the copy would be a second item matrix (100 MB at D=256 on 100,000 items, which broke the
# memory goal: ``python -m benchmarks.run --only loss_memory``).
TRANSPOSE_BYTES = 16 * 2**20
# Blocks narrower than this get contiguous copies of their operands, and their gradient products are taken
# with the narrow side first ([width, items] x [items, rows], [width, rows] x [rows, items]). On this
# machine's CPU MKL runs a [rows, items] x [items, 8] product on a column slice of a wide matrix 4-8x slower
# than on a contiguous copy, and an 8-column block's two gradient products 1.5-2.4x faster narrow side
# first (one and two threads); blocks of 16 or 32 columns are no faster that way, and on two threads slower
# (``python -m benchmarks.run --only narrow_grads``).
NARROW_COLUMNS = 16
# On a CPU every chunk's scores, softmaxes and gradient sums H_k are taken SUB_ROWS rows at a time: that
# many rows of scores (3 MiB on 12,101 items) stay in cache through the sizes' softmaxes, and each size's
# softmax is still in cache when the sums H_k are built over it, in its place (where whole chunks sent every
# softmax to memory and read it back to build H). The leading blocks up to SUB_COLUMNS columns (sizes 8 to
# 256: all of the CPU profile's, the first six of the paper's) also take their GEMMs on those rows; the
# blocks past them take theirs on whole chunks, into their size's buffer, which each sub-chunk adds to its
# scores. The gradient GEMMs keep whole chunks: in ad-hoc one-thread trials the sub-chunked d-items
# products, which re-read their accumulators once per sub-chunk, were slower. On a GPU a chunk is one
# sub-chunk (more would only add kernel launches). Measured: ``python -m benchmarks.run --only
# loss_alone,nested_loss`` (``benchmarks/MEASURED.md``).
SUB_COLUMNS = 256
SUB_ROWS = 64
# Blocks past those and at least TILE_COLUMNS wide (the paper's 256- and 512-column ones) take their forward
# on whole chunks ITEM_TILE items at a time: on this CPU MKL runs a [chunk, items] product with a few hundred
# rows below its rate on the same product as [chunk, ITEM_TILE] tiles, and narrower blocks slower in tiles
# (``python -m benchmarks.run --only loss_alone`` times the loss with and without them). CPU only, like the
# sub-chunks. ITEM_TILE = 0 turns the tiles off.
TILE_COLUMNS = 256
ITEM_TILE = 512
# Rows per step of the leading blocks' transposed item copy (``_transposed``).
TRANSPOSE_ROWS = 256


def auto_chunk_size(n_items: int, n_sizes: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk such that the loss's scratch, (K + 1) x rows x items floats, fits ``budget_bytes``."""
    rows = budget_bytes // ((n_sizes + 1) * max(1, n_items) * 4)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, rows)))


def nested_cross_entropy_reference(
    query: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    sizes: Sequence[int],
    weights: torch.Tensor,
) -> torch.Tensor:
    """sum_k w_k * mean-CE of ``query[:, :m_k] @ items[:, :m_k].T``; autograd through K logit matrices."""
    losses = [F.cross_entropy(logits, targets) for logits in iter_nested_scores(query, items, sizes)]
    return (torch.stack(losses) * weights.to(query)).sum()


def nested_cross_entropy(
    query: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    sizes: Sequence[int],
    weights: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The reference's loss and gradients (to float rounding), with scratch memory of one row chunk.

    ``query`` ``[P, D]``, ``items`` ``[N, D]``, ``targets`` ``[P]`` (item indices), ``sizes`` the nesting
    (last = D), ``weights`` one per size. ``chunk_size`` rows per chunk (None: ``auto_chunk_size``, about
    128 MiB of scratch whatever the number of sizes or rows).
    """
    if query.dim() != 2 or items.dim() != 2 or query.size(1) != items.size(1):
        raise ValueError(
            f"query {tuple(query.shape)} and items {tuple(items.shape)} must be [P, D] and [N, D]"
        )
    if sizes[-1] != query.size(1) or len(weights) != len(sizes):
        raise MatryoshkaSizeError(
            f"sizes {list(sizes)} must end at the width {query.size(1)} and have one weight each "
            f"({len(weights)} given)"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(items.size(0), len(sizes))
    if int(chunk_size) < 1:
        raise MatryoshkaSizeError(
            f"loss_chunk_size={chunk_size!r} must be a positive number of rows, or ~ (auto)."
        )
    scales = [float(w) / max(1, query.size(0)) for w in weights]
    if query.size(0) == 0:  # as F.cross_entropy's mean over no rows
        return query.new_tensor(float("nan")) + 0 * (query.sum() + items.sum())
    return _NestedCrossEntropy.apply(query, items, targets, tuple(sizes), tuple(scales), int(chunk_size))


TINY = 1e-30  # below this a float32 probability has lost precision (denormals start at 1.2e-38)


def _target_nll(scores: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """Sum over rows of -log softmax(scores)[target], from the softmax already computed.

    Rows whose target probability is too small to take the log of use the row's largest probability
    instead (at least 1/N, so its log is exact): log softmax_t = s_t - max s + log max p, the maxima taken
    in one reduction each over the chunk (``amax``: a tenth of ``max`` with indices), and only when some row
    needs it (the random scores of an untrained model often do).
    """
    p_t = probs[rows, targets]
    nll = -torch.log(p_t.clamp_min(TINY))
    small = p_t < TINY
    if small.any():
        log_p_max = torch.log(probs.amax(dim=1)[small])
        nll[small] = scores.amax(dim=1)[small] - scores[rows[small], targets[small]] - log_p_max
    return nll.sum()


def _forward_blocks(q, items_t, s, probs, targets, blocks, scales, products=None):
    """Adds each block's partial product into the scores ``s``, one size at a time, its softmax into
    ``probs[k]``, and returns the weighted sum of the sizes' target NLLs. ``products``: the first block
    that takes its product from ``probs[k]`` (``_block_products``) instead of a GEMM here (None: none)."""
    rows = torch.arange(s.size(0), device=s.device)
    total = s.new_zeros(())
    for k, (a, b) in enumerate(blocks):
        if products is not None and k >= products:
            s.copy_(probs[k]) if k == 0 else s.add_(probs[k])
        elif k == 0:
            torch.mm(q[:, a:b], items_t[a:b], out=s)
        else:
            s.addmm_(q[:, a:b], items_t[a:b])
        if scales[k] != 0:
            torch._softmax(s, 1, False, out=probs[k])
            total += scales[k] * _target_nll(s, probs[k], rows, targets)
    return total


def _block_products(q, items_t, out, blocks, narrow, tile):
    """Each block's partial product ``q[:, a:b] @ items[:, a:b].T`` over a whole chunk into ``out[k]``.
    ``narrow``: (query columns, item rows) of the narrow blocks, as contiguous copies. ``tile``: items per
    GEMM of the blocks at least ``TILE_COLUMNS`` wide (0: all at once)."""
    q_cols, item_rows = narrow
    for k, (a, b) in blocks:
        q_k, e_k = (q_cols[k], item_rows[k]) if k in q_cols else (q[:, a:b], items_t[a:b])
        if tile and b - a >= TILE_COLUMNS and k not in q_cols:
            for n0 in range(0, out.size(2), tile):
                torch.mm(q_k, e_k[:, n0 : n0 + tile], out=out[k, :, n0 : n0 + tile])
        else:
            torch.mm(q_k, e_k, out=out[k])


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """``x.T.contiguous()``, ``TRANSPOSE_ROWS`` rows of ``x`` at a time: on a column slice of a wide matrix
    (the leading blocks' item columns of a large item matrix) torch's one-pass copy ran several times slower
    on this CPU (ad-hoc one-thread timings)."""
    out = x.new_empty(x.size(1), x.size(0))
    for r0 in range(0, x.size(0), TRANSPOSE_ROWS):
        out[:, r0 : r0 + TRANSPOSE_ROWS].copy_(x[r0 : r0 + TRANSPOSE_ROWS].T)
    return out


def _empty_but(like: torch.Tensor, zero_columns: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.empty_like(like)
    for a, b in zero_columns:
        out[:, a:b] = 0
    return out


class _NestedCrossEntropy(torch.autograd.Function):
    """Gradients are computed in the forward pass (the loss is a scalar) and scaled in ``backward``."""

    @staticmethod
    def forward(ctx, query, items, targets, sizes, scales, chunk):
        want_q, want_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want = want_q or want_e
        n_rows, n_items = query.size(0), items.size(0)
        chunk = min(chunk, n_rows)
        starts = [0, *sizes[:-1]]
        blocks = list(zip(starts, sizes, strict=True))
        # Each block's gradient columns are written by the first chunk's GEMM (beta=0) and accumulated after,
        # so only the columns no size's loss reaches (all their weights 0) need zeros: no full zero fill.
        unreached = [(a, b) for k, (a, b) in enumerate(blocks) if not any(scales[k:])]
        grad_q = _empty_but(query, unreached) if want_q else None
        grad_e = _empty_but(items, unreached) if want_e else None
        on_cpu = query.device.type == "cpu"
        sub_rows = min(chunk, SUB_ROWS) if on_cpu and SUB_ROWS > 0 else chunk
        scores = query.new_empty(sub_rows, n_items)
        probs = query.new_empty(len(sizes), chunk, n_items)  # each size's softmax, then its H_k in its place
        total = query.new_zeros(())
        # Row slices of a contiguous E^T make the forward GEMMs faster; the copy is skipped for big catalogues.
        small = items.numel() * items.element_size() <= TRANSPOSE_BYTES
        items_t = items.T.contiguous() if small else items.T
        narrow = {k: slice(a, b) for k, (a, b) in enumerate(blocks) if b - a < NARROW_COLUMNS}
        # Per narrow block: its item columns as contiguous rows [width, items], and a d-items accumulator of
        # the same shape (transposed into grad_e at the end).
        item_rows = {k: items[:, cols].T.contiguous() for k, cols in narrow.items()}
        # The leading blocks, whose GEMMs take sub-chunks, and their item columns as rows; on a GPU, all.
        n_sub = sum(1 for _, b in blocks if b <= SUB_COLUMNS) if on_cpu else len(blocks)
        tile = ITEM_TILE if on_cpu and ITEM_TILE < n_items else 0
        sub_cols = blocks[n_sub - 1][1] if n_sub else 0
        lead_small = items.size(0) * sub_cols * items.element_size() <= TRANSPOSE_BYTES
        sub_t = _transposed(items[:, :sub_cols]) if on_cpu and n_sub and lead_small and not small else items_t
        grad_e_narrow = {k: torch.zeros_like(rows) for k, rows in item_rows.items()} if want_e else {}
        # hsrc[k]: the size whose buffer holds block k's gradient sum (a size of weight 0 shares the next
        # size's), None for blocks no size's loss reaches. The buffers hold H_k / c, c the largest weighted
        # size's scale; the GEMMs multiply by c (alpha), which spares a scaling pass over [rows, items].
        hsrc, c = [None] * len(blocks), None
        for k in reversed(range(len(blocks))):
            if scales[k] != 0:
                hsrc[k], c = k, scales[k] if c is None else c
            elif k + 1 < len(blocks):
                hsrc[k] = hsrc[k + 1]
        for r0 in range(0, n_rows, chunk):
            r1 = min(n_rows, r0 + chunk)
            q, t, p_chunk = query[r0:r1], targets[r0:r1], probs[:, : r1 - r0]
            q_cols = {k: q[:, cols].contiguous() for k, cols in narrow.items()}
            q_rows = {k: cols.T.contiguous() for k, cols in q_cols.items()}
            wide = list(enumerate(blocks))[n_sub:]
            _block_products(q, items_t, p_chunk, wide, (q_cols, item_rows), tile)
            for u0 in range(0, r1 - r0, sub_rows):
                u = slice(u0, min(r1 - r0, u0 + sub_rows))
                s, p, t_u = scores[: u.stop - u0], p_chunk[:, u], t[u]
                total += _forward_blocks(q[u], sub_t, s, p, t_u, blocks, scales, products=n_sub)
                if not want:
                    continue
                # H_k / c = H_{k+1} / c + scale_k / c * (softmax_k - onehot), from the largest size down.
                rows, above = torch.arange(s.size(0), device=s.device), None
                for k in reversed(range(len(blocks))):
                    if hsrc[k] == k:
                        if above is not None:
                            torch.add(above, p[k], alpha=scales[k] / c, out=p[k])
                        p[k][rows, t_u] -= scales[k] / c
                        above = p[k]
            if not want:
                continue
            for k, (a, b) in enumerate(blocks):
                if hsrc[k] is None:
                    continue
                h = p_chunk[hsrc[k]]
                if k in narrow:
                    if want_q:
                        grad_q[r0:r1, a:b] = torch.mm(item_rows[k], h.T).T.mul_(c)
                    if want_e:
                        grad_e_narrow[k].addmm_(q_rows[k], h, alpha=c)
                    continue
                if want_q:
                    grad_q[r0:r1, a:b].addmm_(h, items[:, a:b], beta=0, alpha=c)
                if want_e:
                    grad_e[:, a:b].addmm_(h.T, q[:, a:b], beta=0 if r0 == 0 else 1, alpha=c)
        if want_e:
            for k, acc in grad_e_narrow.items():
                grad_e[:, narrow[k]] = acc.T
        ctx.grads = (grad_q, grad_e)  # plain attributes, so backward can hand them over without a copy
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused nested cross-entropy was already back-propagated: it supports one backward pass "
                "per forward (recompute the loss instead of retain_graph=True)"
            )
        grads, ctx.grads = ctx.grads, None
        unit = bool(grad_output == 1)  # loss.backward(): the gradients are final, no copy of [N, D]
        return (*(g if g is None or unit else g * grad_output for g in grads), None, None, None, None)
