"""Sub-model export: the size-d prefix of a nested model as an ordinary model of hidden size d."""

from __future__ import annotations

import copy

import torch
from torch import nn

from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError


def speaks_matryoshka(model: nn.Module) -> bool:
    """The Matryoshka protocol: ``mrl_sizes`` and ``full_sort_predict_sizes``."""
    return hasattr(model, "mrl_sizes") and callable(getattr(model, "full_sort_predict_sizes", None))


def export_submodel(model: nn.Module, size: int) -> nn.Module:
    """A copy of ``model`` cut to nesting size ``size``: every nested weight sliced, masked-out entries dropped.

    By the nesting invariant its scores equal the full model's size-``size`` scores.
    """
    if not speaks_matryoshka(model):
        raise TypeError(
            f"{type(model).__name__} has no mrl_sizes/full_sort_predict_sizes: not a nested model."
        )
    if size not in model.mrl_sizes:
        raise MatryoshkaSizeError(f"size={size} is not one of the model's mrl_sizes {model.mrl_sizes}.")
    sizes = [s for s in model.mrl_sizes if s <= size]
    sub = copy.deepcopy(model)
    for module in sub.modules():
        if module is not sub and hasattr(module, "slice_"):
            module.slice_(sizes)
    sub.slice_(sizes)
    return sub


def submodel_config_updates(sizes: list[int], size: int) -> dict:
    """Config keys that make ``load_data_and_model`` build the exported model at hidden size ``size``."""
    kept = [s for s in sizes if s <= size]
    return {"hidden_size": size, "embedding_size": size, "mrl_sizes": kept, "eval_size": size}


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
