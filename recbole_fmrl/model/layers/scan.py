"""The LRU's linear recurrence h_t = λ ⊙ h_{t-1} + b_t, computed three ways.

``parallel_scan`` (log depth, on a zero-padded ``[B, L, D]`` tensor) suits CUDA, where kernel launches cost
more than redundant work. ``packed_scan`` (one step per time step, on the valid positions only) suits the
CPU: a batch of Beauty windows is padded to its longest sequence (a profiled batch of 256: 1,520 valid of
12,800 positions), so the padded scan and its autograd (slice gradients that each allocate and zero a full
``[B, L, D]`` complex tensor) did about 8× the useful work there. ``sequential_scan`` is the reference both are tested against.
"""

from __future__ import annotations

import itertools

import torch


def parallel_scan(lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = lam * h_{t-1} + b_t over dim 1 (h_{-1} = 0), in ceil(log2 L) vectorised steps (Hillis-Steele).

    After the step with offset o, h_t holds the sum over the last 2o inputs, so log2 L doublings cover all.
    """
    h, power, offset, length = b, lam, 1, b.size(1)
    while offset < length:
        h = torch.cat([h[:, :offset], h[:, offset:] + power * h[:, :-offset]], dim=1)
        power = power * power
        offset *= 2
    return h


def sequential_scan(lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference step-by-step recurrence (tests compare the other scans against it)."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.size(1)):
        h = lam * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def _time_major(mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(row-major packed index of each time-major packed position, rows active at each step that has any).

    Rows are ordered longest first, so the rows still running at step t are the first ``counts[t]`` of step
    t-1's: step t's states are one contiguous block, and its predecessors the head of the block before.
    """
    lengths = mask.sum(1)
    steps = torch.arange(mask.size(1), device=mask.device)
    if not bool((mask == (steps < lengths.unsqueeze(1))).all()):
        raise ValueError(
            "the sequence mask has a gap: packed_scan needs right-padded rows (valid positions first), as "
            "RecBole's sequential loaders produce"
        )
    order = torch.argsort(lengths, descending=True, stable=True)
    starts = lengths.cumsum(0) - lengths  # row-major offset of each row
    row_major = (starts[order].unsqueeze(1) + steps).T  # [L, B] in time-major order
    active = mask[order].T
    return row_major[active], [n for n in active.sum(1).tolist() if n]  # columns past every row dropped


class _PackedScan(torch.autograd.Function):
    """The recurrence over time-major packed states; its gradient is the same recurrence run backwards with
    conj(λ) (PyTorch's complex convention), so no ``[B, L, D]`` tensor is built in either direction."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
        h = torch.empty_like(b)
        start, prev = 0, None
        for n in counts:
            step = h[start : start + n]
            if prev is None:
                step.copy_(b[start : start + n])
            else:
                torch.addcmul(b[start : start + n], prev[:n], lam, out=step)
            prev, start = step, start + n
        ctx.counts = counts
        ctx.save_for_backward(lam, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        lam, h = ctx.saved_tensors
        counts = ctx.counts
        starts = [0, *itertools.accumulate(counts[:-1])]
        lam_conj = lam.conj()
        grad_b = torch.empty_like(grad_h)
        grad_lam = torch.zeros_like(lam) if ctx.needs_input_grad[0] else None
        later = None  # the gradient reaching step t+1's b (its first counts[t+1] rows)
        for t in range(len(counts) - 1, -1, -1):
            s, n = starts[t], counts[t]
            step = grad_b[s : s + n]
            step.copy_(grad_h[s : s + n])
            if later is not None:
                step[: later.size(0)].addcmul_(later, lam_conj)
            if grad_lam is not None and t > 0:  # h_t = lam * h_{t-1} + b_t
                prev = h[starts[t - 1] : starts[t - 1] + n]
                grad_lam += (step * prev.conj()).sum(0)
            later = step
        return grad_lam, grad_b, None


def packed_scan(lam: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The recurrence on the valid positions of right-padded rows: ``b`` ``[V, D]`` is packed row-major as
    ``x[mask]``, and so is the result. Work and memory scale with V, not with ``mask``'s B × L."""
    index, counts = _time_major(mask)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return _PackedScan.apply(lam, b[index], counts)[inverse]
