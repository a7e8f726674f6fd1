"""Training samples for models that learn from every position of a sequence at once."""

from __future__ import annotations

import numpy as np
from recbole.data.dataloader import TrainDataLoader


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
