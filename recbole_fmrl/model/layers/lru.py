"""Linear recurrent unit (LRU, Orvieto et al. 2023) with nested complex projections.

The recurrence h_t = λ ⊙ h_{t-1} + γ ⊙ B x_t is element-wise per channel, so it keeps the Matryoshka nesting
of its nested in/out projections. ``scan.py`` computes it: a log-depth scan on CUDA, a step loop over the
valid positions on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from recbole_fmrl.model.layers.matryoshka import MatryoshkaFeedForward, MatryoshkaLayerNorm, MatryoshkaLinear
from recbole_fmrl.model.layers.packed import PackedEncoder, packed_rows  # noqa: F401  (public here too)
from recbole_fmrl.model.layers.scan import packed_scan, parallel_scan


class LRULayer(nn.Module):
    """Diagonal complex recurrence with ring initialisation |λ| ∈ [r_min, r_max] and γ normalisation."""

    def __init__(
        self,
        sizes: Sequence[int],
        dropout: float = 0.1,
        r_min: float = 0.0,
        r_max: float = 0.1,
        bias: bool = True,
    ):
        super().__init__()
        d = sizes[-1]
        u1, u2 = torch.rand(d).clamp_min(1e-12), torch.rand(d)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(u2 * 2 * math.pi)
        modulus = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus**2)))
        # B and C are complex: real and imaginary parts as two nested real maps each.
        self.in_re = MatryoshkaLinear(sizes, bias=bias)
        self.in_im = MatryoshkaLinear(sizes, bias=bias)
        self.out_re = MatryoshkaLinear(sizes, bias=bias)
        self.out_im = MatryoshkaLinear(sizes, bias=False)  # Re(C h) = C_re h_re - C_im h_im (+ one bias)
        with (
            torch.no_grad()
        ):  # as the official code: real B and C cast to complex (imaginary parts start at 0)
            for part in (self.in_im, self.out_im):
                part.weight.zero_()
                if part.bias is not None:
                    part.bias.zero_()
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def slice_(self, sizes: Sequence[int]) -> None:
        m = sizes[-1]  # the nested in/out maps are sliced by their own slice_
        for name in ("nu_log", "theta_log", "gamma_log"):
            setattr(self, name, nn.Parameter(getattr(self, name)[:m].clone()))

    def lam(self) -> torch.Tensor:
        return torch.polar(torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the valid positions of ``mask`` ``[B, L]``, packed row-major, ``[V, D]``. Outputs at the same
        packed positions, ``[V, D]``; with ``last`` (one position per row), only those, ``[B, D]``.

        Position-wise maps run on the V valid rows only; padded steps enter the recurrence as zeros (CUDA) or not
        at all (CPU), which is the same for right-padded rows.
        """
        gamma = torch.exp(self.gamma_log)
        valid = torch.complex(self.in_re(x) * gamma, self.in_im(x) * gamma)  # complex on the V rows only
        if last is not None:
            h = self._state_at(valid, mask, last)
        elif valid.is_cuda:  # log depth: fewer kernel launches
            b = valid.new_zeros(*mask.shape, valid.size(-1))
            b[mask] = valid
            h = parallel_scan(self.lam(), b)[mask]
        else:  # one step per time step on the valid positions only: the least work
            h = packed_scan(self.lam(), valid, mask)
        return self.dropout(self.out_re(h.real) - self.out_im(h.imag))

    def _state_at(self, valid: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """h_last = sum_t lam^(last - t) b_t: one weighted sum instead of the whole scan, for inference.

        Computed on the V packed valid rows (a row's steps are contiguous there) rather than on a zero-padded
        [B, L, D] copy, which cost most of an evaluation batch on CPU (short sequences, padded to L). The
        powers lam^0 .. lam^(L-1) come from a table of L rows, plus a zero row for steps after ``last``. Each
        row's steps are summed by ``segment_reduce`` rather than ``index_add_``, which scatters with atomics
        on CUDA (non-deterministic).
        """
        length = mask.size(1)
        steps = torch.arange(length, device=valid.device, dtype=self.nu_log.dtype).unsqueeze(-1)
        table = torch.polar(torch.exp(-torch.exp(self.nu_log) * steps), torch.exp(self.theta_log) * steps)
        table = torch.cat([table, table.new_zeros(1, table.size(1))])  # row L: lag < 0 contributes nothing
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, as the packing
        lag = last[rows] - cols
        weighted = torch.view_as_real(table[torch.where(lag >= 0, lag, length)] * valid)
        sums = torch.segment_reduce(weighted, "sum", lengths=mask.sum(1), axis=0)
        return torch.view_as_complex(sums.contiguous())


class LRUBlock(nn.Module):
    """Pre-norm residual block: nested LN -> LRU -> +x, nested LN -> gated FFN -> +x."""

    def __init__(
        self,
        sizes: Sequence[int],
        dropout: float,
        attn_dropout: float,
        r_min: float,
        r_max: float,
        bias: bool = True,
    ):
        super().__init__()
        self.norm_in = MatryoshkaLayerNorm(sizes)
        self.lru = LRULayer(sizes, dropout=attn_dropout, r_min=r_min, r_max=r_max, bias=bias)
        self.norm_ffn = MatryoshkaLayerNorm(sizes)
        self.ffn = MatryoshkaFeedForward(sizes, dropout=dropout, bias=bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None, last_rows=None
    ) -> torch.Tensor:
        """Packed valid positions ``[V, D]`` in and out (see ``LRULayer``); with ``last``, only those positions
        ``[B, D]``, whose packed rows are ``last_rows`` (the FFN then runs on B rows)."""
        residual = x if last is None else x[last_rows]
        x = residual + self.lru(self.norm_in(x), mask, last)
        return x + self.ffn(self.norm_ffn(x))


class LRUEncoder(PackedEncoder):
    """``n_layers`` LRU blocks; ``block_args`` (dropout, attn_dropout, r_min, r_max, bias) go to each block."""

    def __init__(self, sizes: Sequence[int], n_layers: int, **block_args):
        super().__init__()
        self.blocks = nn.ModuleList(LRUBlock(sizes, **block_args) for _ in range(n_layers))
