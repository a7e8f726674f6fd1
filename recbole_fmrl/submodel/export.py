"""Sub-model export: the size-d prefix of a nested model as an ordinary model of hidden size d."""

from __future__ import annotations

import copy

import torch
from torch import nn

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.abstract_recommender import speaks_matryoshka
from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError


def export_submodel(model: nn.Module, size: int) -> nn.Module:
    """A copy of ``model`` cut to nesting size ``size``: every nested weight sliced, masked-out entries dropped.

    By the nesting invariant its scores equal the full model's size-``size`` scores.
    """
    if not speaks_matryoshka(model):
        raise ConfigError(f"{type(model).__name__} is not a nested (Matryoshka) model: it has no sub-models.")
    if size not in model.mrl_sizes:
        raise MatryoshkaSizeError(f"size={size} is not one of the model's mrl_sizes {model.mrl_sizes}.")
    sizes = [s for s in model.mrl_sizes if s <= size]
    sub = copy.deepcopy(model)
    for module in sub.modules():
        if module is not sub and hasattr(module, "slice_"):
            module.slice_(sizes)
    sub.slice_(sizes)
    return sub


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Stored parameters of the encoder and of the item tower (masked-out entries not counted)."""
    counts = {"encoder": 0, "item_tower": 0}
    masked = {id(m.weight): int((m.mask == 0).sum()) for m in model.modules() if hasattr(m, "mask")}
    for name, p in model.named_parameters():
        part = (
            "item_tower" if name.startswith(("item_tower", "user_embedding", "item_embedding")) else "encoder"
        )
        counts[part] += p.numel() - masked.get(id(p), 0)
    return counts


def checkpoint_size_bytes(model: nn.Module) -> int:
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
