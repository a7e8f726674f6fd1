"""``run_recbole_fmrl``: RecBole's quick start through the plugin's Config, models and trainers.

Built-in RecBole models run through the same function, data and split, which is how benchmarks compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from logging import getLogger

from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_fmrl import compat
from recbole_fmrl.cli import config_from_cli, parser, run_cli
from recbole_fmrl.config import Config
from recbole_fmrl.data.atomic import check_atomic_files
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.evaluation import format_table, report_all_sizes
from recbole_fmrl.fileio import atomic_write
from recbole_fmrl.model.abstract_recommender import speaks_matryoshka
from recbole_fmrl.submodel.checkpoint import check_fits, read_checkpoint
from recbole_fmrl.utils import get_model, get_trainer


def run_recbole_fmrl(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    saved: bool = True,
    cli_args: list[str] | None = None,
    resume_file: str | None = None,
    trust: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train and test ``model`` on ``dataset``; returns RecBole's result dict.

    ``cli_args`` stands for the command line RecBole's Config reads (default: ``sys.argv[1:]``).
    ``resume_file``: a checkpoint RecBole's trainer saved for this model; training continues from its epoch,
    weights, optimizer state and early-stopping count (RecBole's ``resume_checkpoint``), and the best model
    it finds is saved over that file. It is pickled, so it loads only with ``trust`` (or when trusted).
    A ``<checkpoint>-last.pth`` (config ``save_last_checkpoint``) trains on from the last validated epoch
    instead, and the best model found is saved over, and tested from, ``<checkpoint>.pth`` beside it.
    ``on_epoch``: called after each validated epoch, once its checkpoint is saved, with the training record so
    far (``TrainingClock.progress``), so a run killed later can be continued from it instead of lost.
    """
    config = Config(
        model=model,
        dataset=dataset,
        config_file_list=config_file_list,
        config_dict=config_dict,
        cli_args=cli_args,
    )
    check_atomic_files(config)  # before any log line: a bad file is one clear error, not a pandas traceback
    TrainingClock.check_budget(config["time_budget"])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)

    by_size = speaks_matryoshka(model) and _full_ranking(test_data, logger)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if resume_file is not None:
        _resume(trainer, config, resume_file, trust)
    last_file = last_checkpoint_file(trainer.saved_model_file) if saved and _keeps_last(config) else None
    clock = TrainingClock(config["time_budget"])
    callback = clock if on_epoch is None else _reporting(clock, trainer, config, on_epoch, last_file)
    if last_file is not None:
        callback = _keeping_last(trainer, last_file, callback)
    try:
        trainer.fit(
            train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback
        )
    except TimeBudgetReached:
        logger.info(
            f"time_budget of {clock.budget_minutes} minutes reached after epoch {clock.history[-1][0]}: "
            "testing the best model so far"
        )
    clock.stop()
    best_valid_score, best_valid_result = trainer.best_valid_score, trainer.best_valid_result
    if best_valid_result is None and resume_file is not None:  # no better epoch than the checkpoint's
        best_valid_result = trainer.evaluate(
            valid_data, load_best_model=saved, show_progress=config["show_progress"]
        )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    sized = {}
    if by_size:
        sized["test_result_by_size"] = report_all_sizes(config, trainer, test_data)
        if isinstance(valid_data, FullSortEvalDataLoader):  # valid's mode may differ from test's
            sized["valid_result_by_size"] = report_all_sizes(config, trainer, valid_data, split="valid")
    environment_tb = get_environment(config)
    logger.info("The running environment of this training is as follows:\n" + environment_tb.draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_metric": config["valid_metric"],
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
        "last_checkpoint_file": last_file,
        "params": sum(p.numel() for p in model.parameters()),
        **clock.summary(trainer, config),
        **sized,
    }
    return result


def _reporting(
    clock: TrainingClock, trainer, config, on_epoch: Callable[[dict], None], last_file: str | None
):
    """``fit``'s callback: the clock, then ``on_epoch`` with the record so far, budget spent or not."""

    def callback(epoch_idx: int, valid_score: float) -> None:
        try:
            clock(epoch_idx, valid_score)
        finally:
            on_epoch({**clock.progress(trainer, config), "last_checkpoint_file": last_file})

    return callback


LAST_SUFFIX = "-last.pth"


def last_checkpoint_file(best_file: str) -> str:
    """Where ``save_last_checkpoint`` keeps the last validated epoch: beside the best one, named after it."""
    return (best_file[: -len(".pth")] if best_file.endswith(".pth") else best_file) + LAST_SUFFIX


def _keeps_last(config) -> bool:
    keep = config["save_last_checkpoint"]
    if keep is not None and not isinstance(keep, bool):
        raise ConfigError(f"save_last_checkpoint={keep!r} must be True or False.")
    return bool(keep)


def _keeping_last(trainer, last_file: str, then: Callable[[int, float], None]):
    """``fit``'s callback, first saving the epoch just validated (RecBole saves only the best one).

    The file has what ``resume_checkpoint`` reads, with the early-stopping count and best score after this
    epoch, so a resumed run goes on exactly where this one stopped. Written atomically: a run killed while
    saving keeps the previous epoch's file, never half of one.
    """

    def callback(epoch_idx: int, valid_score: float) -> None:
        atomic_write(
            last_file,
            lambda tmp: trainer._save_checkpoint(epoch_idx, verbose=False, saved_model_file=tmp),
            suffix=".pth",
        )
        compat.trust_checkpoint(last_file)  # this process wrote it
        then(epoch_idx, valid_score)

    return callback


def best_epoch(scores: list[float], bigger: bool = True) -> int:
    """Index of the epoch whose checkpoint RecBole keeps: the last of tied best scores.

    RecBole's ``early_stopping`` saves on ``value >= best`` (``<=`` when smaller is better), and valid scores
    are rounded to ``metric_decimal_place``, so ties are common and the later epoch is the one tested.
    """
    best = max(scores) if bigger else min(scores)
    return max(i for i, score in enumerate(scores) if score == best)


class TimeBudgetReached(Exception):
    """Raised between epochs once ``time_budget`` minutes of training have passed."""


class TrainingClock:
    """``fit``'s callback: the validation history, and a wall-clock budget (config ``time_budget``, minutes).

    The budget is checked after each validation, so the best checkpoint so far is saved and then tested:
    a budgeted run ends like an early-stopped one, with nothing lost.
    """

    def __init__(self, budget_minutes: float | None):
        self.budget_minutes = self.check_budget(budget_minutes)
        self.start = time.perf_counter()
        self.history: list[tuple[int, float]] = []
        self.budget_reached = False
        self.train_seconds: float | None = None

    @staticmethod
    def check_budget(budget_minutes) -> float | None:
        if budget_minutes is not None and (
            isinstance(budget_minutes, bool)
            or not isinstance(budget_minutes, (int, float))
            or not budget_minutes > 0
        ):
            raise ConfigError(
                f"time_budget={budget_minutes!r} must be a positive number of minutes, or ~ for no budget."
            )
        return budget_minutes

    def __call__(self, epoch_idx: int, valid_score: float) -> None:
        self.history.append((int(epoch_idx), float(valid_score)))
        if self.budget_minutes is not None and self.elapsed() > 60 * self.budget_minutes:
            self.budget_reached = True
            raise TimeBudgetReached

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stop(self) -> None:
        self.train_seconds = round(self.elapsed(), 3)  # ms: a one-epoch run on tiny data takes < 0.05 s

    def summary(self, trainer, config) -> dict:
        """How training ended: epochs validated, the best epoch, what stopped it, and seconds spent."""
        if self.budget_reached:
            stopped_by = "time_budget"
        elif self.history and trainer.cur_step > trainer.stopping_step:
            stopped_by = "early_stopping"
        else:
            stopped_by = "epochs"
        scores = [score for _, score in self.history]
        best = self.history[best_epoch(scores, config["valid_metric_bigger"])] if self.history else None
        return {
            "epochs": self.history[-1][0] + 1 if self.history else None,
            "best_epoch": best[0] if best else None,
            "stopped_by": stopped_by,
            "train_seconds": self.train_seconds,
            "valid_history": scores,
        }

    def progress(self, trainer, config) -> dict:
        """The record so far, as a run killed now would leave it (``stopped_by: interrupted``).

        RecBole saves the best epoch's checkpoint before ``fit`` calls back, so ``saved_model_file`` holds it.
        """
        return {
            **self.summary(trainer, config),
            "stopped_by": "interrupted",
            "train_seconds": round(self.elapsed(), 3),
            "best_valid_score": trainer.best_valid_score,
            "best_valid_result": trainer.best_valid_result,
            "saved_model_file": trainer.saved_model_file,
        }


def _resume(trainer, config, resume_file: str, trust: bool) -> None:
    """RecBole's ``resume_checkpoint``, after checking that the file is this model's training checkpoint.

    The file is read twice (here, then by RecBole), once per run: cheaper to keep than a copy of RecBole's
    resume logic.
    """
    resume_file = str(resume_file)
    checkpoint, portable = read_checkpoint(resume_file, trust)
    if portable:
        raise ConfigError(
            f"{resume_file} is an exported sub-model, which keeps no optimizer state: resume from the .pth "
            "file the trainer saved in checkpoint_dir."
        )
    _same_model(resume_file, checkpoint, config)
    best_file = None
    if resume_file.endswith(LAST_SUFFIX):  # the last epoch's: the best model is kept, and tested, beside it
        best_file = resume_file[: -len(LAST_SUFFIX)] + ".pth"
        if not os.path.isfile(best_file):
            raise ConfigError(
                f"{resume_file} is a last-epoch checkpoint, and the best model it goes with, {best_file}, is "
                "missing: put it back beside it, or resume from a best checkpoint (training goes on from its "
                "epoch)."
            )
        best, _ = read_checkpoint(best_file, trust or compat.is_trusted(resume_file))
        _same_model(best_file, best, config)
    trainer.resume_checkpoint(resume_file)
    if best_file is not None:
        trainer.saved_model_file = best_file  # RecBole's resume pointed it at the resumed file


def _same_model(path: str, checkpoint: dict, config) -> None:
    saved_model = checkpoint["config"]["model"]
    if str(saved_model).lower() != str(config["model"]).lower():
        raise ConfigError(
            f"{path} is a {saved_model} checkpoint, not {config['model']}: resume with --model={saved_model}."
        )


def _full_ranking(test_data, logger) -> bool:
    """Whether the per-size report can run; said before training, so a sampled-eval run is not lost."""
    if isinstance(test_data, FullSortEvalDataLoader):
        return True
    logger.warning(
        "The per-size (Matryoshka) report needs full ranking, and this run's test set uses sampled "
        "evaluation: only eval_size is reported. For every size, set eval_args mode to 'full'."
    )
    return False


def load_data_and_model(model_file: str, trust: bool = False):
    """(config, model, dataset, train_data, valid_data, test_data) from a checkpoint.

    Works for the plugin's models and RecBole's. Files in the plugin's portable format (exported
    sub-models) load without unpickling, and their config is rebuilt from its typed values with no string
    evaluation. A RecBole checkpoint pickles its Config: it loads only with ``trust=True`` (or after
    ``compat.trust_checkpoint``), or when this process wrote it.
    """
    checkpoint, portable = read_checkpoint(model_file, trust)
    if portable:
        config = Config(
            model=checkpoint["model"], dataset=checkpoint["dataset"], typed_config_dict=checkpoint["config"]
        )
    else:
        config = checkpoint["config"]
        filled = Config.fill_missing_defaults(config) if isinstance(config, Config) else []
    check_atomic_files(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    if not portable and filled:
        logger.info(f"checkpoint config predates keys {filled}: they take their current defaults")

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    check_fits(model, checkpoint["state_dict"], str(model_file))
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def _cli() -> argparse.ArgumentParser:
    cli = parser(
        "run_recbole_fmrl.py",
        "Train and evaluate a recbole-fmrl or RecBole model. Any other --key=value overrides "
        "a RecBole/plugin config key, e.g. --epochs=5 --MAX_ITEM_LIST_LENGTH=10. --debug shows tracebacks.",
    )
    cli.add_argument("--model", "-m", default="fMRLRec", help="model name (plugin or RecBole)")
    cli.add_argument("--dataset", "-d", default="mm-sample", help="dataset name")
    cli.add_argument("--config_files", default=None, help="space-separated yaml config files")
    return cli


def main(argv: list[str] | None = None) -> int:
    """CLI entry: a bad input is one ``error:`` line and exit 2 (``--debug`` shows the traceback)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, overrides = config_from_cli(argv, _cli())
    config_files = args.config_files.split() if args.config_files else None
    result = run_recbole_fmrl(
        model=args.model,
        dataset=args.dataset,
        config_file_list=config_files,
        config_dict=overrides,
        cli_args=[],
    )
    metrics = "  ".join(f"{k}={float(v):.4f}" for k, v in result["test_result"].items())
    print(f"test result ({result['model']} on {args.dataset}): {metrics}")
    if "test_result_by_size" in result:
        print("test result by size:\n" + format_table(result["test_result_by_size"]))
    return 0
