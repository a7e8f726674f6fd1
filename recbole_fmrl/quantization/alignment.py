"""QARM item alignment: a small head on the frozen multimodal features, trained with InfoNCE on item pairs
that users' behaviour links, so that nearby items are items users treat alike, not only items that look alike.

Pairs come from the TRAINING split only (RecBole's augmented sequential training set: every row is a
training target with its training history), so no valid/test interaction can shape the codes:

- U2I: for each training target, the most feature-similar item of its history is the trigger;
- I2I: item-CF (cosine over co-interacting users) top neighbours.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recbole_fmrl.errors import ConfigError


def training_rows(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, history ``[R, L]`` right-padded with 0, targets) of a RecBole sequential training dataset."""
    config = dataset.config
    feat = dataset.inter_feat
    list_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    if list_field not in feat.columns:
        raise ValueError(
            "QARM's behaviour pairs need RecBole's sequential training data (item_id_list): use a "
            "sequential model such as QARMRec."
        )
    return (
        feat[config["USER_ID_FIELD"]].numpy(),
        feat[list_field].numpy(),
        feat[config["ITEM_ID_FIELD"]].numpy(),
    )


def user_item_matrix(dataset) -> sp.csr_matrix:
    """Binary users x items matrix of the training interactions (histories and targets)."""
    users, history, targets = training_rows(dataset)
    rows = np.concatenate([np.repeat(users, history.shape[1]), users])
    cols = np.concatenate([history.reshape(-1), targets])
    keep = cols > 0
    shape = (int(dataset.user_num), int(dataset.item_num))
    matrix = sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])), shape=shape)
    matrix.data[:] = 1.0  # duplicates summed: back to 0/1
    return matrix


def u2i_pairs(dataset, features: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``[P, 2]`` (trigger, target): each training target with its most similar history item (cosine)."""
    _, history, targets = training_rows(dataset)
    unit = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    out = []
    for start in range(0, len(targets), chunk):
        hist = torch.as_tensor(history[start : start + chunk])
        tgt = torch.as_tensor(targets[start : start + chunk])
        sims = torch.einsum("rld,rd->rl", unit[hist], unit[tgt])
        sims = sims.masked_fill(hist == 0, -torch.inf)
        best = hist.gather(1, sims.argmax(1, keepdim=True)).squeeze(1)
        ok = (best > 0) & (best != tgt)
        out.append(torch.stack([best[ok], tgt[ok]], 1))
    return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.int64)


def item_cf_neighbours(matrix: sp.csr_matrix, n: int) -> np.ndarray:
    """``[P, 2]`` (item, neighbour): each item's ``n`` most cosine-similar items over co-interacting users."""
    co = (matrix.T @ matrix).tocsr().astype(np.float32)
    degree = np.sqrt(np.asarray(co.diagonal()).clip(min=1.0))
    co.setdiag(0)
    co.eliminate_zeros()
    co = sp.diags(1.0 / degree) @ co @ sp.diags(1.0 / degree)
    co = co.tocsr()
    pairs = []
    for item in range(co.shape[0]):
        lo, hi = co.indptr[item], co.indptr[item + 1]
        if hi == lo:
            continue
        top = np.argsort(-co.data[lo:hi], kind="stable")[:n]
        pairs.extend((item, int(j)) for j in co.indices[lo:hi][top])
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def neighbour_agreement(features: np.ndarray, matrix: sp.csr_matrix) -> float:
    """Share of items whose nearest item (cosine, in ``features``) was co-interacted with it by some user."""
    co = (matrix.T @ matrix).tocsr()
    items = np.flatnonzero(np.asarray(matrix.sum(0)).ravel() > 0)
    items = items[items > 0]
    unit = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    hits = 0
    for start in range(0, len(items), 4096):
        rows = torch.as_tensor(items[start : start + 4096])
        sims = unit[rows] @ unit.T
        sims[:, 0] = -torch.inf
        sims[torch.arange(len(rows)), rows] = -torch.inf
        nearest = sims.argmax(1).numpy()
        hits += int(np.asarray(co[rows.numpy().copy(), nearest.copy()]).ravel().astype(bool).sum())
    return hits / max(len(items), 1)


class AlignmentHead(nn.Module):
    """x -> normalise(x + MLP(x)). The last layer starts at zero, so training starts from the raw features."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x + self.mlp(x), dim=-1)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives over unit vectors."""
    logits = anchor @ positive.T / temperature
    labels = torch.arange(len(anchor))
    return 0.5 * (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels))


def train_alignment(
    features: np.ndarray,
    pairs: np.ndarray,
    epochs: int,
    batch_size: int = 1024,
    lr: float = 1e-3,
    temperature: float = 0.07,
    hidden: int = 512,
    seed: int = 2020,
) -> tuple[np.ndarray, list[float]]:
    """(aligned features ``[n_items, dim]``, row 0 kept at zero; mean InfoNCE of each epoch)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    pairs_t = torch.as_tensor(pairs, dtype=torch.int64)
    if len(pairs_t) < 2:
        raise ConfigError(
            f"only {len(pairs_t)} behaviour pairs in the training data: too few to align; set qarm_align: False."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AlignmentHead(x.shape[1], hidden)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = []
        for _ in range(epochs):
            order = torch.randperm(len(pairs_t), generator=generator)
            total, batches = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = pairs_t[order[start : start + batch_size]]
                if len(batch) < 2:
                    continue
                loss = info_nce(head(x[batch[:, 0]]), head(x[batch[:, 1]]), temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            history.append(total / max(batches, 1))
        with torch.no_grad():
            aligned = head(x)
    aligned[0] = 0.0
    return aligned.numpy(), history
