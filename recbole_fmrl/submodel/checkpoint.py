"""Portable checkpoints: config as plain data + tensors, readable with ``torch.load(weights_only=True)``.

RecBole pickles its whole Config into checkpoints, so loading one means unpickling arbitrary objects. Files
this plugin writes (exported sub-models) hold only primitives and tensors instead; ``load_data_and_model``
rebuilds the Config from them, and RecBole's own Trainer reads their ``state_dict`` as usual.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from recbole_fmrl import compat
from recbole_fmrl.errors import CheckpointError
from recbole_fmrl.fileio import atomic_write

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


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is loaded into."""


def portable_config(config) -> dict:
    """The user-settable part of a RecBole Config, as JSON-able data."""
    out = {k: v for k, v in config.final_config_dict.items() if k not in _DERIVED and _plain_data(v)}
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
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def _plain_data(value) -> bool:
    """JSON-like data only: what a portable config may hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def _torch_load(path: str, weights_only: bool):
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": RecBole saves with protocol 4
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:120]}): the file is "
            "truncated or not a torch checkpoint; point --model_file at a complete file RecBole or this plugin saved."
        ) from None


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> tuple[dict, bool]:
    """(checkpoint dict, portable?) of ``path``, never unpickling an untrusted file.

    Portable files (this plugin's format) load with ``weights_only=True``; RecBole's pickled checkpoints load
    only when ``trust`` is given or the file was already trusted (``compat.trust_checkpoint``).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist: check the path (RecBole saves to checkpoint_dir, saved/)."
        )
    try:
        state = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        state = None  # pickled Python objects: a RecBole checkpoint
    if state is None:
        if not (trust or compat.is_trusted(path)):
            raise CheckpointError(str(compat.refusal(path)))
        compat.trust_checkpoint(path)
        state = _torch_load(path, weights_only=False)
        if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
            raise CheckpointError(f"{path} is not a RecBole checkpoint (no config/state_dict).")
        return state, False
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return _checked_portable(state, path), True
    raise CheckpointError(
        f"{path} holds only tensors, not a checkpoint with its config: load it into a model you build yourself, "
        "or pass a checkpoint written by RecBole's trainer or by python -m recbole_fmrl.cli.export."
    )


def _checked_portable(state: dict, path: str) -> dict:
    """A portable checkpoint whose fields have the types the format promises (nothing to evaluate)."""
    from recbole_fmrl.utils import plugin_models

    config = state.get("config")
    if not isinstance(config, dict) or not _plain_data(config):
        raise CheckpointError(
            f"{path}: its config is not plain data (strings, numbers, lists, dicts): a damaged or forged file."
        )
    if state.get("model") not in plugin_models():
        raise CheckpointError(
            f"{path}: model {state.get('model')!r} is not a recbole-fmrl model; portable files hold exported "
            f"sub-models of {', '.join(plugin_models())}."
        )
    if not isinstance(state.get("dataset"), str) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path}: dataset or state_dict missing: a damaged file; export it again.")
    return state


def read_portable(path: str | os.PathLike) -> dict | None:
    """The checkpoint if it is in the portable format (loaded safely), else None."""
    try:
        state, portable = read_checkpoint(path)
    except CheckpointError:
        return None
    return state if portable else None


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
        "or export the size you need with python -m recbole_fmrl.cli.export."
    )
