"""Trainers of the plugin's models; ``get_trainer`` finds ``<Model>Trainer`` here before RecBole's."""

from __future__ import annotations

import numpy as np
from recbole.data.dataloader import TrainDataLoader
from recbole.trainer import Trainer


def last_windows(train_data: TrainDataLoader, max_len: int, uid_field: str) -> TrainDataLoader:
    """Keep the augmented samples whose windows tile each user's sequence once, ending at its last item.

    RecBole's sequential data augmentation yields every prefix of every user; a model trained on all
    positions needs only the longest window (and, for long sequences, earlier non-overlapping windows).
    """
    dataset = train_data._dataset
    uids = dataset.inter_feat[uid_field].numpy()
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
            train_data = last_windows(
                train_data, self.config["MAX_ITEM_LIST_LENGTH"], self.config["USER_ID_FIELD"]
            )
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
