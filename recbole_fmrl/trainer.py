"""Trainers of the plugin's models; ``get_trainer`` finds ``<Model>Trainer`` here before RecBole's."""

from __future__ import annotations

import numpy as np
from recbole.data.dataloader import TrainDataLoader
from recbole.trainer import Trainer


def last_windows(train_data: TrainDataLoader) -> TrainDataLoader:
    """Keep the augmented samples whose windows tile each user's sequence once, ending at its last item.

    RecBole's sequential data augmentation yields every prefix of every user; a model trained on all
    positions needs only the longest window (and, for long sequences, earlier non-overlapping windows).
    """
    dataset, config = train_data._dataset, train_data.config
    max_len = config["MAX_ITEM_LIST_LENGTH"]  # the length RecBole truncated the prefixes to
    uids = dataset.inter_feat[config["USER_ID_FIELD"]].numpy()
    starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]])
    if len(np.unique(uids[starts])) != len(starts):
        raise ValueError("training samples are not grouped by user; cannot build all-position windows")
    group_len = np.diff(np.r_[starts, len(uids)])
    pos = np.arange(len(uids)) - np.repeat(starts, group_len)
    keep = np.flatnonzero((np.repeat(group_len, group_len) - 1 - pos) % max_len == 0)
    windows = dataset.copy(dataset.inter_feat[keep])
    return TrainDataLoader(train_data.config, windows, train_data._sampler, shuffle=train_data.shuffle)


class fMRLRecTrainer(Trainer):  # noqa: N801
    """RecBole's Trainer; with ``train_mode: all_positions`` it trains on one window per user sequence."""

    def fit(
        self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None
    ):
        if self.config["train_mode"] == "all_positions":
            train_data = last_windows(train_data)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
