"""MRL4Rec: Matryoshka BPR and Matryoshka negative sampling on MF or LightGCN.

"Matryoshka Representation Learning for Recommendation" (2024). Every nesting level k scores with the first
m_k coordinates; each level gets its own hard negative (the candidate its prefix scores highest), so small
prefixes are trained against negatives that are hard *for them*.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.general_recommender.lightgcn import LightGCN
from recbole.model.init import xavier_uniform_initialization
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.abstract_recommender import MatryoshkaRecommender, require_int, slice_embedding

NEG_MODES = ("mns", "rns", "dns")
DENSE_LOOKUP_CELLS = 1 << 28  # 256 MB of booleans


class MRL4Rec(MatryoshkaRecommender, GeneralRecommender):
    """Matryoshka BPR on MF (``n_layers: 0``) or LightGCN, with a hard negative per nesting level."""

    input_type = InputType.PAIRWISE
    SIZE_KEY = "embedding_size"

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config["mrl_neg_sampling"] not in NEG_MODES:
            raise ConfigError(
                f"mrl_neg_sampling={config['mrl_neg_sampling']!r} is not valid: use one of {NEG_MODES}."
            )
        require_int(config, "n_negs", 1, "candidate negatives per level")
        require_int(config, "n_layers", 0, "0 = MF, > 0 = LightGCN")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.init_nesting(config)
        self.n_layers = int(config["n_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.n_negs = int(config["n_negs"])
        self.neg_mode = config["mrl_neg_sampling"]

        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)
        self.apply(xavier_uniform_initialization)

        train = dataset.inter_matrix(form="coo").astype("float32")
        self.interaction_matrix = train
        # Training positives for candidate rejection: a dense bitmap when it is small enough (one gather),
        # else sorted user*n_items+item keys searched by bisection.
        rows, cols = torch.from_numpy(train.row.astype("int64")), torch.from_numpy(train.col.astype("int64"))
        dense = keys = None
        if self.n_users * self.n_items <= DENSE_LOOKUP_CELLS:
            dense = torch.zeros(self.n_users, self.n_items, dtype=torch.bool)
            dense[rows, cols] = True
        else:
            keys = torch.unique(rows * self.n_items + cols)
        self.register_buffer("positive_mask", dense, persistent=False)
        self.register_buffer("positive_keys", keys, persistent=False)
        if self.n_layers > 0:
            self.register_buffer("norm_adj", LightGCN.get_norm_adj_mat(self).coalesce(), persistent=False)
        self._eval_cache = None

    # -- Matryoshka protocol -----------------------------------------------------------------------------
    def slice_(self, sizes: list[int]) -> None:
        for name in ("user_embedding", "item_embedding"):
            setattr(self, name, slice_embedding(getattr(self, name), sizes[-1]))
        super().slice_(sizes)
        self._eval_cache = None

    def train(self, mode: bool = True):
        self._eval_cache = None
        return super().train(mode)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item representations: the embeddings (MF) or LightGCN's mean over layers."""
        users, items = self.user_embedding.weight, self.item_embedding.weight
        if self.n_layers == 0:
            return users, items
        layer = torch.cat([users, items])
        total = layer
        for _ in range(self.n_layers):
            layer = torch.sparse.mm(self.norm_adj, layer)
            total = total + layer
        total = total / (self.n_layers + 1)
        return total[: self.n_users], total[self.n_users :]

    def _representations(self):
        if self.training:
            return self.forward()
        if self._eval_cache is None:
            self._eval_cache = self.forward()
        return self._eval_cache

    # -- negatives -----------------------------------------------------------------------------------------
    def is_training_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) pair is a training interaction; ``items`` may add a trailing dim."""
        users = users.unsqueeze(-1).expand_as(items) if items.dim() > users.dim() else users
        if self.positive_mask is not None:
            return self.positive_mask[users, items]
        keys = users * self.n_items + items
        idx = torch.searchsorted(self.positive_keys, keys).clamp_max(len(self.positive_keys) - 1)
        return self.positive_keys[idx] == keys

    def sample_candidates(self, users: torch.Tensor, n: int, max_rounds: int = 100) -> torch.Tensor:
        """``[B, n]`` items drawn uniformly among those each user has not interacted with in training."""
        cand = torch.randint(1, self.n_items, (len(users), n), device=users.device)
        for _ in range(max_rounds):
            bad = self.is_training_positive(users, cand)
            if not bad.any():
                return cand
            cand[bad] = torch.randint(1, self.n_items, (int(bad.sum()),), device=users.device)
        raise RuntimeError("could not draw negatives: some users have interacted with (almost) every item")

    def shared_negatives(
        self, user_e: torch.Tensor, items: torch.Tensor, users: torch.Tensor
    ) -> torch.Tensor:
        """``[B, K]``: one DNS negative by the full-size score, shared by every level (the paper's MRL w/o MNS)."""
        cand = self.sample_candidates(users, self.n_negs)
        with torch.no_grad():
            scores = torch.bmm(items[cand], user_e[:, :, None]).squeeze(2)
        pick = cand.gather(1, scores.argmax(dim=1, keepdim=True))
        return pick.expand(-1, len(self.mrl_sizes))

    def level_negatives(self, user_e: torch.Tensor, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: per level, the candidate with the highest level-k prefix score (DNS per level)."""
        k_levels = len(self.mrl_sizes)
        cand = self.sample_candidates(users, k_levels * self.n_negs).view(len(users), k_levels, self.n_negs)
        picks = []
        with torch.no_grad():
            for k, m in enumerate(self.mrl_sizes):  # K levels, each one batched GEMM over [B, n_negs, m_k]
                scores = torch.bmm(items[cand[:, k], :m], user_e[:, :m, None]).squeeze(2)
                picks.append(cand[:, k].gather(1, scores.argmax(dim=1, keepdim=True)))
        return torch.cat(picks, dim=1)

    # -- loss and scores -----------------------------------------------------------------------------------
    def prefix_scores(self, user_e: torch.Tensor, item_e: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` dot products of the first m_k coordinates, from block sums (one pass)."""
        starts = [0, *self.mrl_sizes[:-1]]
        blocks = torch.stack(
            [
                (user_e[..., s:e] * item_e[..., s:e]).sum(-1)
                for s, e in zip(starts, self.mrl_sizes, strict=True)
            ],
            dim=-1,
        )
        return blocks.cumsum(dim=-1)

    def calculate_loss(self, interaction) -> torch.Tensor:
        users, pos = interaction[self.USER_ID], interaction[self.ITEM_ID]
        user_all, item_all = self.forward()
        user_e = user_all[users]
        if self.neg_mode == "rns":  # one independent random unseen negative per level, as the official code
            negs = self.sample_candidates(users, len(self.mrl_sizes))
        elif self.neg_mode == "dns":
            negs = self.shared_negatives(user_e, item_all, users)
        else:
            negs = self.level_negatives(user_e, item_all, users)
        pos_s = self.prefix_scores(user_e, item_all[pos])  # [B, K]
        neg_s = self.prefix_scores(user_e.unsqueeze(1), item_all[negs]).diagonal(dim1=1, dim2=2)  # [B, K]
        bpr = (F.softplus(neg_s - pos_s).mean(dim=0) * self.size_weights).sum()
        # L2 on the layer-0 embeddings of the batch, as the paper: decay * (|u|^2 + |p|^2 + |n|^2) / 2 / B
        reg = (
            self.user_embedding(users).pow(2).sum()
            + self.item_embedding(pos).pow(2).sum()
            + self.item_embedding(negs).pow(2).sum()
        ) / 2
        return bpr + self.reg_weight * reg / len(users)

    def score_operands(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        user_all, item_all = self._representations()
        return user_all[interaction[self.USER_ID]], item_all

    def full_sort_predict(self, interaction) -> torch.Tensor:
        user_all, item_all = self._representations()
        m = self.eval_size
        return (user_all[interaction[self.USER_ID], :m] @ item_all[:, :m].T).view(-1)

    def predict(self, interaction) -> torch.Tensor:
        user_all, item_all = self._representations()
        m = self.eval_size
        u, i = interaction[self.USER_ID], interaction[self.ITEM_ID]
        return (user_all[u, :m] * item_all[i, :m]).sum(-1)
