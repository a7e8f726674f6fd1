"""Every fix RecBole 1.2.1 needs on today's stack (numpy 2, torch >= 2.6, recent scipy, ray 2.6.3), plus
one bug of its own that breaks metrics our evaluator must support (training statistics in the Collector).

Applied once by ``import recbole_fmrl``, before RecBole or ray are imported, so user code never sees the
breakages. Each fix is narrow and idempotent and has a test in ``tests/test_compat.py`` that fails without it.
pandas 3 is handled by the ``pandas<3`` pin instead (see README: RecBole's Dataset relies on pandas-2
semantics in several places).
"""

from __future__ import annotations

import os
import pickle
import types
import warnings

import numpy as np
import torch

# numpy 2 removed these aliases; RecBole's code (``np.float`` in Dataset._fill_nan, ...) and ray 2.6.3
# (``np.bool8``) still use them. Only names numpy no longer has are added, so numpy 2's own ``np.bool``
# and ``np.long`` keep their meaning.
_NUMPY_ALIASES = {
    "bool": np.bool_,
    "bool8": np.bool_,
    "int": np.int_,
    "float": np.float64,
    "float_": np.float64,
    "complex": np.complex128,
    "complex_": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "unicode": np.str_,
    "unicode_": np.str_,
    "long": np.int_,
}


def _has(module: types.ModuleType, name: str) -> bool:
    with warnings.catch_warnings():  # numpy warns when asked for an expired alias
        warnings.simplefilter("ignore", FutureWarning)
        try:
            getattr(module, name)
        except AttributeError:
            return False
    return True


def restore_numpy_aliases() -> None:
    """Define the numpy-1 aliases RecBole and ray still use, where numpy 2 dropped them."""
    for name, value in _NUMPY_ALIASES.items():
        if not _has(np, name):
            setattr(np, name, value)


def _patch_recbole_config() -> None:
    # RecBole's Config.compatibility_settings assigns ``np.float = np.float_`` (AttributeError on numpy 2).
    from recbole.config import configurator

    configurator.Config.compatibility_settings = lambda self: restore_numpy_aliases()


def _dok_update(self, data: dict) -> None:
    """Bulk insert that RecBole's graph models call; scipy >= 1.15 removed ``dok_matrix._update``."""
    self._dict.update(data)


def _patch_scipy_dok() -> None:
    import scipy.sparse as sp

    if not hasattr(sp.dok_matrix, "_update"):
        sp.dok_matrix._update = _dok_update


def _data_struct_to_cpu(self):
    """RecBole's ``get_data_struct`` with only tensors moved to the CPU.

    RecBole 1.2.1 calls ``.cpu()`` on every collected entry, including the int/Counter training statistics
    that ``data_collect`` stores, so ItemCoverage, AveragePopularity and TailPercentage always crash.
    """
    import copy

    data = self.data_struct._data_dict
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            data[key] = value.cpu()
    returned = copy.deepcopy(self.data_struct)
    for key in ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label"):
        if key in self.data_struct:
            del self.data_struct[key]
    return returned


def _patch_recbole_collector() -> None:
    from recbole.evaluator.collector import Collector

    Collector.get_data_struct = _data_struct_to_cpu


# --- torch >= 2.6: ``torch.load`` defaults to ``weights_only=True``, and RecBole checkpoints pickle the
# whole Config, so the trainer's best-model reload, resume and ``load_data_and_model`` all fail.
# Chosen fix (narrow, not the process-wide TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): only RecBole's trainer gets a
# ``torch.load`` that unpickles a full object graph, and only for a file this process wrote through RecBole's
# Trainer or one the user marked as trusted (``trust_checkpoint``). Every other file goes through torch's safe
# weights-only loader. RecBole's saved datasets and dataloaders (``save_dataset``, ``save_dataloaders``) are
# plain pickles that ``create_dataset``/``data_preparation`` load whenever the file exists: the same rule
# applies to them.
_TRUSTED: set[str] = set()


class UntrustedFileError(pickle.UnpicklingError):
    """A file holds pickled Python objects and nobody said to trust it; the message says how to."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


def trust_checkpoint(path: str | os.PathLike) -> None:
    """Allow RecBole's loaders to unpickle ``path`` (a checkpoint or saved dataset you or your run wrote)."""
    _TRUSTED.add(os.path.realpath(path))


def is_trusted(path: str | os.PathLike) -> bool:
    return os.path.realpath(path) in _TRUSTED


_TRUST_CHECKPOINT = (
    "If you trust it, pass --trust (CLI), load_data_and_model(path, trust=True), or call "
    "recbole_fmrl.compat.trust_checkpoint(path) first."
)


def refusal(path, what: str = "checkpoint", fix: str = _TRUST_CHECKPOINT) -> UntrustedFileError:
    return UntrustedFileError(
        f"Refusing to unpickle {what} {path!s}: it holds pickled Python objects (RecBole's format), and "
        f"unpickling a file can run code. {fix}"
    )


def load_recbole_checkpoint(f, map_location=None, **kwargs):
    """``torch.load`` for RecBole checkpoints: safe load first, full unpickling only for trusted files."""
    kwargs.pop("weights_only", None)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": RecBole saves with protocol 4
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        if not isinstance(f, (str, os.PathLike)) or not is_trusted(f):
            raise refusal(f) from None
    return torch.load(f, map_location=map_location, weights_only=False, **kwargs)


class _TorchWithCheckpointLoad(types.ModuleType):
    """``torch`` as seen by RecBole's trainer module: everything but ``load`` is torch's."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.load = load_recbole_checkpoint

    def __getattr__(self, name: str):
        return getattr(torch, name)


class _GuardedPickle(types.ModuleType):
    """``pickle`` as seen by RecBole's data modules: files it dumps become trusted, others are refused."""

    def __init__(self) -> None:
        super().__init__("pickle")

    def __getattr__(self, name: str):
        return getattr(pickle, name)

    @staticmethod
    def dump(obj, file, *args, **kwargs):
        pickle.dump(obj, file, *args, **kwargs)
        trust_checkpoint(file.name)

    @staticmethod
    def load(file, *args, **kwargs):
        name = getattr(file, "name", None)
        if name is None or not is_trusted(name):
            raise refusal(
                name,
                "saved RecBole dataset/dataloader",
                "To rebuild from the atomic files, delete it; or, if you trust it, call "
                "recbole_fmrl.compat.trust_checkpoint(path) before the run.",
            )
        return pickle.load(file, *args, **kwargs)


def _guard_recbole_data_pickles() -> None:
    from recbole.data import utils
    from recbole.data.dataset import dataset

    for module in (utils, dataset):
        if not isinstance(module.pickle, _GuardedPickle):
            module.pickle = _GuardedPickle()


def _patch_recbole_checkpoints() -> None:
    from recbole.trainer import trainer

    if isinstance(trainer.torch, _TorchWithCheckpointLoad):
        return
    trainer.torch = _TorchWithCheckpointLoad()
    save = trainer.Trainer._save_checkpoint

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        saved = kwargs.get("saved_model_file", self.saved_model_file)
        save(self, epoch, verbose=verbose, **kwargs)
        trust_checkpoint(saved)

    trainer.Trainer._save_checkpoint = _save_checkpoint


# Warnings raised inside RecBole/ray on the pinned stack that a user cannot act on: pkg_resources (ray 2.6.3,
# hence the setuptools<81 pin), pandas-3 deprecations in RecBole's Dataset (harmless under the pandas<3 pin),
# RecBole's use of the old GradScaler name.
_UPSTREAM_WARNINGS = (
    (UserWarning, "pkg_resources is deprecated"),
    (
        FutureWarning,
        "A value is trying to be set on a copy of a DataFrame or Series through chained assignment",
    ),
    (FutureWarning, "using <built-in function len> in Series.agg cannot aggregate"),
    (FutureWarning, r"`torch.cuda.amp.GradScaler\(args...\)` is deprecated"),
)


def _quiet_upstream_warnings() -> None:
    for category, message in _UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _patch_recbole_exhaustive_search() -> None:
    """hyperopt >= 0.2.7 samples with numpy Generators (``rng.integers``), but RecBole's grid search seeds a
    legacy ``RandomState``, so every ``algo='exhaustive'`` search fails. Its module gets a numpy whose
    ``random.RandomState`` makes a Generator; nothing else changes."""
    from recbole.trainer import hyper_tuning

    if getattr(hyper_tuning.np, "_recbole_fmrl_proxy", False):
        return
    proxy = types.ModuleType("numpy")
    proxy.__dict__.update(np.__dict__)
    proxy.random = types.SimpleNamespace(**{**vars(np.random), "RandomState": np.random.default_rng})
    proxy._recbole_fmrl_proxy = True
    hyper_tuning.np = proxy


_applied = False


def apply() -> None:
    """Apply every fix once; safe to call again."""
    global _applied
    if _applied:
        return
    restore_numpy_aliases()
    _quiet_upstream_warnings()
    _patch_scipy_dok()
    _patch_recbole_config()
    _patch_recbole_checkpoints()
    _guard_recbole_data_pickles()
    _patch_recbole_collector()
    _patch_recbole_exhaustive_search()
    _applied = True
