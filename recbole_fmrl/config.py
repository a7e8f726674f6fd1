"""RecBole Config that also reads the plugin's yaml defaults and finds the plugin's models and datasets."""

from __future__ import annotations

import ast
import os
import sys
from enum import Enum
from pathlib import Path

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_fmrl.errors import ConfigError, RecboleFmrlError
from recbole_fmrl.paths import dataset_dirs, properties_dir
from recbole_fmrl.utils import get_model

_PLAIN = (str, int, float, list, tuple, dict, bool, Enum)


class DatasetNotFoundError(RecboleFmrlError, FileNotFoundError):
    """The dataset's atomic files are not where RecBole would read them."""


def literal_value(text: str):
    """A command-line/config string as the Python literal it spells (``"[8, 16]"`` -> list), else the string.

    RecBole's own conversion calls ``eval`` on every string value; this reads literals only, so a value such as
    ``"__import__('os').system(...)"`` stays a string and nothing runs.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.lower()
        return True if lowered == "true" else False if lowered == "false" else text
    return value if value is None or isinstance(value, _PLAIN) else text


class Config(RecBoleConfig):
    """RecBole's Config, plus ``properties/{overall,model/<Model>,dataset/<name>}.yaml`` of this plugin.

    Precedence, lowest first: RecBole's defaults, ours, then the user's config files, dict and command line.
    ``typed_config_dict`` is for values read back from a file (portable checkpoints): they are taken as they
    are, never converted from strings. ``cli_args`` replaces ``sys.argv[1:]`` as the command line RecBole
    reads (``[]``: none), so a CLI's ``main(argv)`` honours exactly the argv it is given.
    """

    def __init__(
        self,
        model=None,
        dataset=None,
        config_file_list=None,
        config_dict=None,
        typed_config_dict=None,
        cli_args: list[str] | None = None,
    ):
        self._typed_config_dict = dict(typed_config_dict or {})
        self._cli_args = cli_args
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except RecboleFmrlError:
            raise
        except (ValueError, TypeError) as err:  # RecBole's own checks of its keys (topk, eval_args, ...)
            raise ConfigError(f"RecBole rejected the config: {err}") from err
        check = getattr(self.model_class, "check_config", None)
        if check is not None:  # the plugin's models validate their keys before any data is read
            check(self)

    def _convert_config_dict(self, config_dict):
        for key, value in config_dict.items():
            if isinstance(value, str):
                config_dict[key] = literal_value(value)
        return config_dict

    def _load_config_files(self, file_list):
        for file in file_list or []:
            if not os.path.isfile(file):
                raise ConfigError(f"config file {file} does not exist: fix the path given to --config_files.")
        try:
            loaded = super()._load_config_files(file_list)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file {file_list}:{where} is not valid YAML ({getattr(err, 'problem', err)})."
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config files {file_list}: not UTF-8 text; save them as UTF-8 YAML.") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config files {file_list} must hold key: value pairs (a YAML mapping).")
        return loaded

    def _load_cmd_line(self):
        if self._cli_args is None:
            return super()._load_cmd_line()
        saved, sys.argv = sys.argv, [sys.argv[0], *self._cli_args]
        try:
            return super()._load_cmd_line()
        finally:
            sys.argv = saved

    def _load_variable_config_dict(self, config_dict):
        converted = super()._load_variable_config_dict(config_dict)
        return {**converted, **self._typed_config_dict}

    def _get_model_and_dataset(self, model, dataset):
        if isinstance(model, str) or model is None:
            model = model if model is not None else self.external_config_dict.get("model")
            if isinstance(model, str):
                model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        # A plugin model inherits the yaml defaults (and CPU profile) of the plugin models it extends.
        lineage = [c.__name__ for c in reversed(getattr(model_class, "__mro__", ())) if c.__name__ != model]
        lineage = [name for name in lineage if (props / "model" / f"{name}.yaml").is_file()] + [model]
        files = [props / "overall.yaml", *(props / "model" / f"{name}.yaml" for name in lineage)]
        if self._wants_cpu_profile():
            files += [props / "profiles" / f"{name}-cpu.yaml" for name in lineage]
        files.append(props / "dataset" / f"{dataset}.yaml")
        for file in files:
            if file.is_file():
                config_dict = self._update_internal_config_dict(str(file))
                if file.parent.name == "dataset":
                    self.parameters["Dataset"] += [
                        k for k in config_dict if k not in self.parameters["Dataset"]
                    ]

    def fill_missing_defaults(self) -> list[str]:
        """Give keys that the plugin's yaml defaults gained since this Config was saved (a pickled RecBole
        checkpoint from an older version) their default values; returns the keys filled."""
        props = properties_dir()
        lineage = [c.__name__ for c in reversed(getattr(self.model_class, "__mro__", ()))]
        files = [props / "overall.yaml", *(props / "model" / f"{name}.yaml" for name in lineage)]
        filled = []
        for file in files:
            if not file.is_file():
                continue
            with open(file, encoding="utf-8") as f:
                defaults = yaml.load(f.read(), Loader=self.yaml_loader) or {}
            for key, value in defaults.items():
                if key not in self.final_config_dict:
                    self.final_config_dict[key] = value
                    filled.append(key)
        return filled

    def _wants_cpu_profile(self) -> bool:
        """``device_profile: auto`` (default) picks the model's CPU profile when there is no usable GPU."""
        setting = self.external_config_dict.get(
            "device_profile", self.internal_config_dict.get("device_profile")
        )
        if setting in ("cpu", "paper"):
            return setting == "cpu"
        import torch

        use_gpu = self.external_config_dict.get("use_gpu", self.internal_config_dict.get("use_gpu", True))
        return not (use_gpu and torch.cuda.is_available())

    def _set_default_parameters(self):
        final, external = self.final_config_dict, self.external_config_dict
        if "data_path" not in external:
            for folder in dataset_dirs():
                if (folder / self.dataset).is_dir():
                    final["data_path"] = str(folder)
                    break
        if self.dataset != "ml-100k":  # RecBole always reads its bundled ml-100k
            check_dataset_files(os.path.join(final["data_path"], self.dataset), self.dataset)
        # RecBole 1.2.1's sequential preset keeps negative sampling on, which its own check then rejects for
        # CE loss (SASRec & co. fail out of the box); CE trains on all items, so sampling is off unless asked.
        if (
            final.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and final.get("loss_type") == "CE"
            and "train_neg_sample_args" not in external
        ):
            final["train_neg_sample_args"] = None
        super()._set_default_parameters()


def check_dataset_files(data_path: str | os.PathLike, dataset: str) -> None:
    """Fail in seconds, offline, when the atomic files are missing (RecBole would try a download)."""
    folder = Path(data_path)
    if (folder / f"{dataset}.inter").is_file():
        return
    searched = ", ".join(str(d) for d in dataset_dirs())
    raise DatasetNotFoundError(
        f"Dataset '{dataset}' not found: no atomic file {folder / (dataset + '.inter')}. "
        f"Without --data_path the plugin looks in {searched} (and RecBole's bundled ml-100k). "
        f"Point --data_path at the folder that holds '{dataset}/{dataset}.inter' "
        f"(for this project's real Amazon sets: --data_path=../shared/datasets), or build the atomic files "
        f"from the raw Amazon 2014 files with `python -m recbole_fmrl.data.amazon --reviews FILE --meta FILE "
        f"--out DIR`. Nothing is downloaded."
    )
