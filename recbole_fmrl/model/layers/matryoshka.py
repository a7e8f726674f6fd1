"""Nested ("Matryoshka") building blocks: the first m_k coordinates of every output depend only on the
first m_k coordinates of the input, for every size m_k in ``sizes``. Slicing every weight to m_k therefore
gives an exact standalone model of hidden size m_k (each module's ``slice_``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.errors import ConfigError


class MatryoshkaSizeError(ConfigError):
    """``mrl_sizes`` (or ``eval_size``) is not a valid nesting."""


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MatryoshkaSizeError(f"{name}={value!r} is not an integer: give a whole number, e.g. {name}=64.")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number != int(number):
        raise MatryoshkaSizeError(f"{name}={value!r} is not an integer: give a whole number, e.g. {name}=64.")
    return int(number)


def check_sizes(
    sizes: Sequence[int],
    hidden_size: int | None = None,
    name: str = "mrl_sizes",
    size_key: str = "hidden_size",
) -> list[int]:
    """Validate a nesting: positive, strictly increasing, ending at ``hidden_size`` (config key ``size_key``)."""
    if isinstance(sizes, (str, int, float)) or sizes is None:
        raise MatryoshkaSizeError(f"{name}={sizes!r} is not a list of sizes: give e.g. {name}=[8,16,32,64].")
    sizes = [_as_int(s, name) for s in sizes]
    if not sizes:
        raise MatryoshkaSizeError(f"{name} is empty: give at least one size, e.g. {name}: [64].")
    if any(s <= 0 for s in sizes):
        raise MatryoshkaSizeError(f"{name} {sizes} has a size <= 0: every nesting size must be positive.")
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise MatryoshkaSizeError(
            f"{name} {sizes} is not strictly increasing: sort them and drop duplicates."
        )
    if hidden_size is not None and sizes[-1] != hidden_size:
        raise MatryoshkaSizeError(
            f"the last of {name} {sizes} must equal {size_key} ({hidden_size}): "
            f"set {size_key}={sizes[-1]} or end {name} with {hidden_size}."
        )
    return sizes


def block_ids(sizes: Sequence[int]) -> torch.Tensor:
    """Index of the nesting block (m_{k-1}, m_k] that each coordinate belongs to."""
    starts = [0, *sizes[:-1]]
    return torch.cat(
        [
            torch.full((e - s,), k, dtype=torch.long)
            for k, (s, e) in enumerate(zip(starts, sizes, strict=True))
        ]
    )


class MatryoshkaLinear(nn.Module):
    """Block-lower-triangular linear map applied as one GEMM with a fixed mask.

    Output block k (``out_sizes[k-1]:out_sizes[k]``) reads ``input[..., :in_sizes[k]]``. Masked weights are
    zero at init and get zero gradient, so they stay inert; export drops them.
    """

    def __init__(self, in_sizes: Sequence[int], out_sizes: Sequence[int] | None = None, bias: bool = True):
        super().__init__()
        out_sizes = list(in_sizes) if out_sizes is None else list(out_sizes)
        if len(in_sizes) != len(out_sizes):
            raise MatryoshkaSizeError(f"in_sizes {in_sizes} and out_sizes {out_sizes} differ in length")
        self.in_sizes, self.out_sizes = list(in_sizes), out_sizes
        d_in, d_out = in_sizes[-1], out_sizes[-1]
        row_reads = torch.tensor(in_sizes)[block_ids(out_sizes)]  # how many inputs each output row reads
        mask = torch.arange(d_in).unsqueeze(0) < row_reads.unsqueeze(1)
        self.register_buffer("mask", mask.float(), persistent=False)
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.register_buffer("_fan_in", row_reads.float(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's init, with each row's fan-in being what that row reads (as a standalone m_k model has).
        bound = 1.0 / self._fan_in.sqrt()
        self.weight.uniform_(-1.0, 1.0).mul_(bound.unsqueeze(1)).mul_(self.mask)
        if self.bias is not None:
            self.bias.uniform_(-1.0, 1.0).mul_(bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    @torch.no_grad()
    def slice_(self, sizes: Sequence[int]) -> None:
        """Keep the first ``len(sizes)`` nesting levels, in place (sub-model export)."""
        level = len(sizes)
        self.in_sizes, self.out_sizes = self.in_sizes[:level], self.out_sizes[:level]
        d_in, d_out = self.in_sizes[-1], self.out_sizes[-1]
        self.weight = nn.Parameter(self.weight[:d_out, :d_in].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias[:d_out].clone())
        self.mask = self.mask[:d_out, :d_in].clone()
        self._fan_in = self._fan_in[:d_out].clone()

    def extra_repr(self) -> str:
        return f"in_sizes={self.in_sizes}, out_sizes={self.out_sizes}, bias={self.bias is not None}"


class MatryoshkaLayerNorm(nn.Module):
    """Layer norm of each nesting block (m_{k-1}, m_k] on its own: one ``F.layer_norm`` per block.

    K fused kernels instead of a scatter (``index_add_``), which is non-deterministic on CUDA.
    """

    def __init__(self, sizes: Sequence[int], eps: float = 1e-5):
        super().__init__()
        self.sizes = list(sizes)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(self.sizes[-1]))

    @torch.no_grad()
    def slice_(self, sizes: Sequence[int]) -> None:
        self.sizes = self.sizes[: len(sizes)]
        m = self.sizes[-1]
        self.weight = nn.Parameter(self.weight[:m].clone())
        self.bias = nn.Parameter(self.bias[:m].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        starts = [0, *self.sizes[:-1]]
        blocks = [
            F.layer_norm(x[..., s:e], (e - s,), self.weight[s:e], self.bias[s:e], self.eps)
            for s, e in zip(starts, self.sizes, strict=True)
        ]
        return torch.cat(blocks, dim=-1)


class MatryoshkaFeedForward(nn.Module):
    """Gated (SiLU) position-wise feed-forward from nested linears, as in LRURec/fMRLRec."""

    def __init__(self, sizes: Sequence[int], dropout: float = 0.1, bias: bool = True):
        super().__init__()
        self.gate = MatryoshkaLinear(sizes, bias=bias)
        self.w_1 = MatryoshkaLinear(sizes, bias=bias)
        self.w_2 = MatryoshkaLinear(sizes, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate(x)) * self.dropout(self.w_1(x))
        return self.dropout(self.w_2(hidden))


def iter_nested_scores(query: torch.Tensor, items: torch.Tensor, sizes: Sequence[int]):
    """Yield the scores at each size in turn, ``[P, n_items]``, for a 2-D ``query``.

    Size k's scores are size k-1's plus one block's partial product, fused into one ``addmm``: all sizes
    together cost one full-size GEMM, with no extra pass over the score matrices.
    """
    scores, start = None, 0
    for end in sizes:
        q, e = query[:, start:end], items[:, start:end].T
        scores = q @ e if scores is None else torch.addmm(scores, q, e)
        start = end
        yield scores


def iter_size_scores(query: torch.Tensor, items: torch.Tensor, sizes: Sequence[int], reuse: bool = False):
    """Yield each size's scores as its exported model computes them: ``query[:, :m] @ items[:, :m].T``.

    For serving and ``mrl_eval_scoring: exact``. The fused sum (``iter_nested_scores``, and the evaluator's
    default) adds in another order, and a last-bit difference can swap two near-tied items; this computes
    what the standalone size-m model computes (the same GEMM shape) at a cost of at most twice one full-size
    GEMM for doubling sizes.

    ``reuse``: yield one ``[P, n_items]`` buffer, overwritten for each size (so each yield is valid until the
    next is asked for). A fresh score matrix per size costs its page faults, on CPU as much as a small GEMM.
    """
    out = None
    for end in sizes:
        if not reuse:
            yield query[:, :end] @ items[:, :end].T
            continue
        if out is None:
            out = query.new_empty(query.size(0), items.size(0))
        yield torch.mm(query[:, :end], items[:, :end].T, out=out)


def loss_weights(config, n_sizes: int) -> torch.Tensor:
    """Per-size loss weights, normalised to sum 1 (default: uniform, i.e. the mean over sizes)."""
    weights = config["mrl_loss_weights"]
    if weights is None:
        return torch.full((n_sizes,), 1.0 / n_sizes)
    problem = (
        f"mrl_loss_weights={weights!r} must be a list of one non-negative weight per size ({n_sizes} sizes) "
    )
    try:
        weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    except (TypeError, ValueError):
        raise MatryoshkaSizeError(problem + "with a positive sum, e.g. [1, 1, 2].") from None
    if (
        len(weights) != n_sizes
        or not torch.isfinite(weights).all()
        or (weights < 0).any()
        or weights.sum() <= 0
    ):
        raise MatryoshkaSizeError(
            problem + "with a positive sum; fix the list or remove it for uniform weights."
        )
    return (weights / weights.sum()).float()


def nesting_from_config(config, size_key: str) -> tuple[list[int], int, torch.Tensor]:
    """(sizes, eval_size, loss weights) of a nested model's config, validated with errors naming the keys."""
    hidden = _as_int(config[size_key], size_key)
    sizes = check_sizes(config["mrl_sizes"], hidden, size_key=size_key)
    eval_size = sizes[size_index(sizes, config["eval_size"])]
    return sizes, eval_size, loss_weights(config, len(sizes))


def size_index(sizes: Sequence[int], size: int | None, name: str = "eval_size") -> int:
    """Position of ``size`` in ``sizes`` (None = the largest); a clear error when it is not one of them."""
    if size is None:
        return len(sizes) - 1
    value = _as_int(size, name)
    if value not in sizes:
        raise MatryoshkaSizeError(f"{name}={size!r} is not one of mrl_sizes {list(sizes)}: pick one of them.")
    return list(sizes).index(value)
