"""Trainers of the plugin's models; ``get_trainer`` finds ``<Model>Trainer`` here before RecBole's."""

from __future__ import annotations

import math
import warnings

import torch
from recbole.trainer import Trainer

from recbole_fmrl.data.training_windows import last_windows
from recbole_fmrl.errors import ConfigError

SCHEDULES = ("cosine", "constant")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """lr factor: linear warm-up to 1 over ``warmup_steps``, then a cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fused_optimizer_supported(params) -> bool:
    """Adam(W)'s fused kernel updates in place: no full-size temporaries (about one [N, D] item matrix less
    peak memory) and one pass per step. It needs floating-point parameters all on CPU or all on CUDA."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


class fMRLRecTrainer(Trainer):  # noqa: N801
    """RecBole's Trainer with the official fMRLRec optimisation.

    - AdamW/Adam with ``adam_eps``, no weight decay on biases and norm weights, trained item-feature tables
      at ``feature_lr_scale`` times the learning rate, and the fused kernel where the parameters allow it;
    - ``lr_scheduler: cosine``: linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay over
      ``epochs`` epochs, stepped after every optimizer step;
    - ``train_mode: all_positions``: one window per user sequence, while RecBole's training statistics (for
      popularity/coverage metrics) still come from the full training data.
    """

    def _build_optimizer(self, **kwargs):
        learner = kwargs.pop("learner", self.config["learner"]).lower()
        if learner not in ("adam", "adamw"):
            return super()._build_optimizer(learner=learner, **kwargs)
        lr = kwargs.pop("learning_rate", self.learning_rate)
        weight_decay = kwargs.pop("weight_decay", self.weight_decay)
        tables = {id(p) for p in getattr(self.model, "trained_feature_tables", list)()}
        decay, no_decay, features = [], [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in tables:
                features.append(param)
            else:
                (no_decay if "bias" in name or "norm" in name else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if features:
            scale = float(self.config["feature_lr_scale"])
            groups.append({"params": features, "weight_decay": weight_decay, "lr": lr * scale})
        optimizer = torch.optim.AdamW if learner == "adamw" else torch.optim.Adam
        params = [p for group in groups for p in group["params"]]
        return optimizer(
            groups, lr=lr, eps=float(self.config["adam_eps"]), fused=fused_optimizer_supported(params)
        )

    def _attach_schedule(self, steps_per_epoch: int) -> None:
        schedule = self.config["lr_scheduler"]
        if schedule not in SCHEDULES:
            raise ConfigError(f"lr_scheduler={schedule!r} is not valid: use one of {SCHEDULES}.")
        if schedule == "constant":
            return
        total = int(self.config["epochs"]) * max(1, steps_per_epoch)
        factor = warmup_cosine(int(self.config["warmup_steps"]), total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        # A resumed run (RecBole's resume_checkpoint sets start_epoch) continues the schedule where it was:
        # the schedule is a function of the optimizer steps done, start_epoch x steps_per_epoch.
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(int(self.start_epoch) * max(1, steps_per_epoch)):
                self.scheduler.step()
        self.optimizer.register_step_post_hook(lambda *_: self.scheduler.step())

    def fit(
        self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None
    ):
        full = train_data
        if self.config["train_mode"] == "all_positions":
            train_data = last_windows(train_data)
        self._attach_schedule(len(train_data))
        collect = self.eval_collector.data_collect
        self.eval_collector.data_collect = lambda _data: collect(full)  # statistics of all training data
        try:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            del self.eval_collector.data_collect
