"""Nested Mamba (selective state-space) blocks for fMRLRec, in the Mamba4Rec shape.

Why every prefix of size m_k stays a standalone model (invariant 1). With expansion e, the inner channels
are ordered by nesting block, so the first e*m_k inner channels belong to size m_k:

- in/out projections and the per-channel step Δ are ``MatryoshkaLinear`` maps (inner block k reads model
  coordinates [:m_k], Δ of block k reads inner channels [:e*m_k], output block k reads inner [:e*m_k]);
- the causal convolution is depthwise (one filter per channel), A = -exp(A_log) and the skip D are per
  channel, and the scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t runs per channel: none mixes channels;
- the selection B_t and C_t (shared by all channels, as in Mamba) is computed from the smallest block's
  inner channels only, which every size has. So B and C are the same in every sub-model.

Hence the first e*m_k inner channels, and the first m_k outputs, read only the first m_k inputs, and slicing
every weight to its prefix (``slice_``) gives the size-m_k model exactly.

Paths: ``mamba_ssm``'s CUDA ``selective_scan_fn`` (and ``causal_conv1d`` when present) for CUDA inputs;
elsewhere a chunked PyTorch scan (a log-depth Hillis-Steele scan inside each time chunk, chunks carried in
order). ``selective_scan_reference`` is the step-by-step recurrence the tests compare against. ``mamba_impl``
picks: ``auto`` (CUDA kernels for CUDA tensors when importable; a CPU run never imports ``mamba_ssm``),
``cuda`` or ``torch``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.layers.matryoshka import MatryoshkaFeedForward, MatryoshkaLayerNorm, MatryoshkaLinear
from recbole_fmrl.model.layers.packed import PackedEncoder

MAMBA_IMPLS = ("auto", "cuda", "torch")


def selective_scan_reference(u, delta, A, B, C, D):
    """Step-by-step selective scan. ``u``, ``delta``: ``[b, L, E]``; ``A``: ``[E, N]``; ``B``, ``C``:
    ``[b, L, N]``; ``D``: ``[E]``. Returns y ``[b, L, E]`` with y_t = C_t·h_t + D u_t."""
    h = u.new_zeros(u.size(0), u.size(2), A.size(1))
    out = []
    for t in range(u.size(1)):
        decay = torch.exp(delta[:, t, :, None] * A)
        h = decay * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        out.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(out, dim=1) + u * D


def selective_scan_torch(u, delta, A, B, C, D, chunk: int = 16):
    """The same scan as ``selective_scan_reference``: log-depth within time chunks of ``chunk`` steps, the
    state carried from chunk to chunk. ``chunk=1`` is the step loop over precomputed decays and inputs: the
    fewest operations, fastest on a CPU; longer chunks trade operations for parallel depth (GPUs)."""
    if chunk == 1:  # unbind, not slicing: one backward node instead of a full-size zero gradient per step
        decay = torch.exp(delta.unsqueeze(-1) * A).unbind(1)  # L x [b, E, N]
        inputs = ((delta * u).unsqueeze(-1) * B.unsqueeze(2)).unbind(1)
        readout = C.unsqueeze(-1).unbind(1)  # L x [b, N, 1]
        h = inputs[0]
        out = [torch.bmm(h, readout[0])]
        for t in range(1, u.size(1)):
            h = torch.addcmul(inputs[t], decay[t], h)
            out.append(torch.bmm(h, readout[t]))
        return torch.cat(out, dim=-1).transpose(1, 2) + u * D
    h0 = u.new_zeros(u.size(0), u.size(2), A.size(1))
    out = []
    for s in range(0, u.size(1), chunk):
        dl = delta[:, s : s + chunk, :, None]
        a = torch.exp(dl * A)  # [b, T, E, N]
        x = dl * B[:, s : s + chunk, None, :] * u[:, s : s + chunk, :, None]
        offset = 1
        while offset < a.size(1):  # after offset o, (a_t, x_t) compose the last 2o steps
            x = torch.cat([x[:, :offset], x[:, offset:] + a[:, offset:] * x[:, :-offset]], dim=1)
            a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
            offset *= 2
        h = x + a * h0[:, None]
        out.append((h * C[:, s : s + chunk, None, :]).sum(-1))
        h0 = h[:, -1]
    return torch.cat(out, dim=1) + u * D


def mamba_ssm_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


def check_mamba_impl(impl: str, device: torch.device | str | None = None) -> None:
    """One clear error for an unknown ``mamba_impl`` or for ``cuda`` where it cannot run."""
    if impl not in MAMBA_IMPLS:
        raise ConfigError(f"mamba_impl={impl!r} is not valid: use one of {MAMBA_IMPLS}.")
    if impl != "cuda":
        return
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        raise ConfigError(
            "mamba_impl=cuda needs a CUDA GPU for the model, and this run has none: use mamba_impl: auto "
            "(the PyTorch scan on CPU) or torch."
        )
    if not mamba_ssm_available():
        raise ConfigError(
            "mamba_impl=cuda needs the mamba-ssm package, which is not installed: pip install '.[cuda]' "
            "(builds with CUDA), or use mamba_impl: auto or torch."
        )


class MambaLayer(nn.Module):
    """Nested selective SSM: in-projection, causal depthwise conv, selective scan, SiLU gate, out-projection."""

    def __init__(
        self,
        sizes: Sequence[int],
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.1,
        bias: bool = True,
        impl: str = "auto",
        chunk: int | None = None,
    ):
        super().__init__()
        check_mamba_impl(impl)
        self.impl, self.chunk, self.expand = impl, chunk, expand
        inner = [expand * m for m in sizes]
        self.in_x = MatryoshkaLinear(sizes, inner, bias=bias)
        self.in_z = MatryoshkaLinear(sizes, inner, bias=bias)
        self.conv = nn.Conv1d(inner[-1], inner[-1], d_conv, groups=inner[-1], padding=d_conv - 1)
        self.select = nn.Linear(inner[0], 2 * d_state, bias=False)  # B_t, C_t from the smallest block
        self.dt = MatryoshkaLinear(inner, inner, bias=True)
        with torch.no_grad():  # Mamba's init: small Δ weights, Δ bias = softplus^-1(dt), dt log-uniform
            self.dt.weight.mul_(0.1)
            dt = torch.exp(torch.rand(inner[-1]) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(inner[-1], 1))
        self.D = nn.Parameter(torch.ones(inner[-1]))
        self.out = MatryoshkaLinear(inner, sizes, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def slice_(self, sizes: Sequence[int]) -> None:
        e = self.expand * sizes[-1]  # the nested linears are sliced by their own slice_
        conv = nn.Conv1d(e, e, self.conv.kernel_size[0], groups=e, padding=self.conv.padding[0])
        conv = conv.to(self.conv.weight)
        conv.weight.copy_(self.conv.weight[:e])
        conv.bias.copy_(self.conv.bias[:e])
        self.conv = conv
        self.A_log = nn.Parameter(self.A_log[:e].clone())
        self.D = nn.Parameter(self.D[:e].clone())

    def _use_cuda(self, x: torch.Tensor) -> bool:
        if self.impl == "torch" or x.device.type != "cuda":
            if self.impl == "cuda":
                check_mamba_impl("cuda", x.device)
            return False
        return self.impl == "cuda" or mamba_ssm_available()

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None, last_rows=None
    ) -> torch.Tensor:
        """Packed valid positions ``x`` ``[V, D]`` of ``mask`` ``[B, L]`` in; the same positions out, or with
        ``last`` (packed rows ``last_rows``) only those, ``[B, D]``. Right padding follows every valid step
        of its row, and the conv and scan are causal, so padding never reaches a valid output."""
        dense = x.new_zeros(*mask.shape, self.conv.in_channels)
        dense[mask] = self.in_x(x)
        width = mask.size(1)
        A = -torch.exp(self.A_log.float())
        if self._use_cuda(x):
            y, u = self._cuda_scan(dense, A)
        else:
            u = F.silu(self.conv(dense.transpose(1, 2))[..., :width].transpose(1, 2))
            delta, bc = self._selection(u)
            chunk = self.chunk or (16 if x.is_cuda else 1)
            y = selective_scan_torch(u, delta, A, *bc.chunk(2, dim=-1), self.D, chunk)
        if last is None:
            y, z = y[mask], self.in_z(x)
        else:
            y, z = y[torch.arange(mask.size(0), device=mask.device), last], self.in_z(x[last_rows])
        return self.dropout(self.out(y * F.silu(z)))

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softplus(self.dt(u)), self.select(u[..., : self.select.in_features])

    def _cuda_scan(self, dense: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        width = dense.size(1)
        xt = dense.transpose(1, 2).contiguous()  # [B, E, L]
        if importlib.util.find_spec("causal_conv1d") is not None:
            from causal_conv1d import causal_conv1d_fn

            ut = causal_conv1d_fn(xt, self.conv.weight.squeeze(1), self.conv.bias, activation="silu")
        else:
            ut = F.silu(self.conv(xt)[..., :width])
        u = ut.transpose(1, 2)
        delta, bc = self._selection(u)
        b, c = bc.chunk(2, dim=-1)
        y = selective_scan_fn(
            ut.contiguous(),
            delta.transpose(1, 2).contiguous(),
            A.contiguous(),
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            self.D.float(),
        )
        return y.transpose(1, 2), u


class MambaBlock(nn.Module):
    """Pre-norm residual block (as ``LRUBlock``): nested LN -> Mamba -> +x, nested LN -> gated FFN -> +x."""

    def __init__(self, sizes: Sequence[int], dropout: float, attn_dropout: float, bias: bool = True, **mamba):
        super().__init__()
        self.norm_in = MatryoshkaLayerNorm(sizes)
        self.mamba = MambaLayer(sizes, dropout=attn_dropout, bias=bias, **mamba)
        self.norm_ffn = MatryoshkaLayerNorm(sizes)
        self.ffn = MatryoshkaFeedForward(sizes, dropout=dropout, bias=bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None, last_rows=None
    ) -> torch.Tensor:
        residual = x if last is None else x[last_rows]
        x = residual + self.mamba(self.norm_in(x), mask, last, last_rows)
        return x + self.ffn(self.norm_ffn(x))


class MambaEncoder(PackedEncoder):
    """``n_layers`` nested Mamba blocks; ``block_args`` (dropout, attn_dropout, bias, d_state, d_conv, expand,
    impl, chunk) go to each block."""

    def __init__(self, sizes: Sequence[int], n_layers: int, **block_args):
        super().__init__()
        self.blocks = nn.ModuleList(MambaBlock(sizes, **block_args) for _ in range(n_layers))
