"""Encoders over the valid (packed) positions of right-padded sequences, shared by the LRU and Mamba stacks."""

from __future__ import annotations

import torch
from torch import nn


class PackedEncoder(nn.Module):
    """A stack ``self.blocks`` whose blocks map packed valid positions ``[V, D]`` to the same, called as
    ``block(x, mask, last=None, last_rows=None)``; the final block may return only the ``last`` positions."""

    blocks: nn.ModuleList

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` of ``x`` ``[B, L, D]`` (zero at padded positions); with ``last``, only
        the final block's output at those positions, ``[B, D]``."""
        out = self.forward_packed(x[mask], mask, last)
        if last is not None:
            return out
        full = out.new_zeros(*mask.shape, out.size(-1))
        full[mask] = out
        return full

    def forward_packed(
        self, x: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: the valid positions of ``mask`` ``[B, L]``, packed row-major, ``[V, D]``. Returns the same
        packed positions ``[V, D]``, or with ``last``, the final block's output at those positions ``[B, D]``.

        Padded positions never reach a position-wise map (layer norms, projections, FFN): they cost nothing
        and, as the recurrence is causal and they enter it as zeros, change nothing.
        """
        last_rows = None if last is None else packed_rows(mask, last)
        *body, final = self.blocks
        for block in body:
            x = block(x, mask)
        return final(x, mask, last, last_rows)


def packed_rows(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row of position ``(b, positions[b])`` in the row-major packing ``x[mask]``; each must be valid."""
    rows = mask.flatten().cumsum(0).view(mask.shape) - 1
    picked = torch.arange(mask.size(0), device=mask.device)
    if not bool(mask[picked, positions].all()):
        raise ValueError(
            "a sequence's last position (item_seq_len - 1) is padding: item_seq must hold item_seq_len "
            "items (ids >= 1) from the left, as RecBole's sequential loaders produce"
        )
    return rows[picked, positions]
