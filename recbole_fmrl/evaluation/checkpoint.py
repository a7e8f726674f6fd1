"""Portable checkpoints: config as plain data + tensors, readable with ``torch.load(weights_only=True)``.

RecBole pickles its whole Config into checkpoints, so loading one means unpickling arbitrary objects. Files
this plugin writes (exported sub-models) hold only primitives and tensors instead; ``load_data_and_model``
rebuilds the Config from them, and RecBole's own Trainer reads their ``state_dict`` as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "recbole-fmrl/1"
# Keys RecBole derives while building a Config; passing them back in would clash with that derivation.
_DERIVED = {
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "eval_type",
    "device",
    "local_rank",
    "single_spec",
    "model",
    "dataset",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "data_path",
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _is_plain(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def portable_config(config) -> dict:
    """The user-settable part of a RecBole Config, as JSON-able data."""
    out = {k: v for k, v in config.final_config_dict.items() if k not in _DERIVED and _is_plain(v)}
    neg = out.get("train_neg_sample_args")
    if isinstance(neg, dict) and neg.get("distribution") == "none":
        out["train_neg_sample_args"] = None
    data_path = str(config["data_path"])
    out["data_path"] = os.path.dirname(data_path.rstrip("/")) if config["dataset"] != "ml-100k" else data_path
    return out


def save_portable(path: str | os.PathLike, config, model: torch.nn.Module, **overrides) -> Path:
    """Write ``model`` with ``config`` (plus ``overrides``) in the portable format, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "model": config["model"],
        "dataset": config["dataset"],
        "config": {**portable_config(config), **overrides},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_portable(path: str | os.PathLike) -> dict | None:
    """The checkpoint if it is in the portable format (loaded safely), else None."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def check_fits(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Clear error when ``state_dict`` is of another model or size than ``model``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    what = []
    if missing or unexpected:
        what.append(
            f"different parameters (missing {missing[:3]}, unexpected {unexpected[:3]}): another model type"
        )
    if shapes:
        k, theirs, ours = shapes[0]
        what.append(f"different sizes ({k}: file {theirs}, model {ours}): another hidden size or dataset")
    raise CheckpointMismatchError(
        f"{source} does not fit this {type(model).__name__}: {'; '.join(what)}. Load it with "
        "recbole_fmrl.quick_start.load_data_and_model(file), which builds the model the file was saved from, "
        "or export the size you need with python -m recbole_fmrl.export."
    )
