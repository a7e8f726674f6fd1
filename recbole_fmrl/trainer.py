"""Trainers of the plugin's models; ``get_trainer`` finds ``<Model>Trainer`` here before RecBole's."""

from __future__ import annotations

from recbole.trainer import Trainer

from recbole_fmrl.data.training_windows import last_windows


class fMRLRecTrainer(Trainer):  # noqa: N801
    """RecBole's Trainer; with ``train_mode: all_positions`` it trains on one window per user sequence."""

    def fit(
        self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None
    ):
        if self.config["train_mode"] == "all_positions":
            train_data = last_windows(train_data)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
