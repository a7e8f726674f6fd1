"""Model and trainer lookup: the plugin's first, then RecBole's (RecBole-GNN's pattern)."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.paths import properties_dir

_SUBMODULES = ("sequential_recommender", "general_recommender")


class UnknownModelError(ConfigError):
    """Neither the plugin nor RecBole has a model of that name."""


def _plugin_model_module(model_name: str):
    for submodule in _SUBMODULES:
        path = f"recbole_fmrl.model.{submodule}.{model_name.lower()}"
        try:
            if importlib.util.find_spec(path) is not None:
                return importlib.import_module(path)
        except ModuleNotFoundError:  # a parent package is missing: not ours
            continue
    return None


def plugin_models() -> list[str]:
    """Names of the plugin's own models."""
    return sorted(p.stem for p in (properties_dir() / "model").glob("*.yaml"))


def available_models() -> tuple[list[str], list[str]]:
    """(plugin models, RecBole models), named as their yaml defaults are: that is how users spell them."""
    import recbole

    ours = plugin_models()
    theirs = sorted(p.stem for p in (Path(recbole.__file__).parent / "properties" / "model").glob("*.yaml"))
    return ours, theirs


def get_model(model_name: str):
    """The model class called ``model_name``: ours first, else RecBole's; a clear error otherwise."""
    module = _plugin_model_module(model_name)
    if module is not None and hasattr(module, model_name):
        return getattr(module, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ImportError):  # RecBole's lookup imports exlib models whose extras may be missing
        pass
    ours, theirs = available_models()
    close = difflib.get_close_matches(model_name, ours + theirs, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model '{model_name}'.{hint} Model names are case-sensitive. "
        f"recbole-fmrl models: {', '.join(ours)}. RecBole models: {', '.join(theirs)}."
    )


def get_trainer(model_type, model_name: str):
    """``<Model>Trainer`` from ``recbole_fmrl.trainer`` for the plugin model or the plugin model it extends,
    else RecBole's choice."""
    trainers = importlib.import_module("recbole_fmrl.trainer")
    module = _plugin_model_module(model_name)
    lineage = getattr(getattr(module, model_name, None), "__mro__", ())
    for name in [model_name, *(c.__name__ for c in lineage)]:
        trainer = getattr(trainers, name + "Trainer", None)
        if trainer is not None:
            return trainer
    return recbole_get_trainer(model_type, model_name)
