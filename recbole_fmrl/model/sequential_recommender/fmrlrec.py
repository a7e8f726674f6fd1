"""fMRLRec: multimodal item tower + nested LRU encoder trained at every Matryoshka size at once.

"Train Once, Deploy Anywhere: Matryoshka Representation Learning for Multimodal Recommendation"
(EMNLP 2024 Findings). Any prefix of size m_k of the hidden state is itself a complete model of size m_k.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.data.features import as_list, load_item_features
from recbole_fmrl.model.layers.lru import LRUEncoder
from recbole_fmrl.model.layers.matryoshka import (
    check_sizes,
    iter_nested_scores,
    iter_size_scores,
    loss_weights,
    size_index,
    slice_protocol_,
)

TRAIN_MODES = ("prefix", "all_positions")


class ItemTower(nn.Module):
    """Item embedding = projection(concat of modality features) [+ ID embedding]; used for input and output.

    Frozen features are a non-persistent buffer: checkpoints stay small and reload them from the feature
    cache; trainable features are a parameter and are saved.
    """

    def __init__(
        self,
        n_items: int,
        hidden_size: int,
        features: dict[str, torch.Tensor],
        use_id_embedding: bool,
        freeze_features: bool,
    ):
        super().__init__()
        self.modalities = list(features)
        self.projection = None
        if features:
            stacked = torch.cat([features[m] for m in self.modalities], dim=1).float()
            if freeze_features:
                self.register_buffer("features", stacked, persistent=False)
            else:
                self.features = nn.Parameter(stacked)
            self.projection = nn.Linear(stacked.size(1), hidden_size)
        self.id_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0) if use_id_embedding else None
        if self.projection is None and self.id_embedding is None:
            raise ValueError("fMRLRec needs item features (modalities) or use_id_embedding: True.")

    @torch.no_grad()
    def slice_(self, sizes: list[int]) -> None:
        m = sizes[-1]
        if self.projection is not None:
            old = self.projection
            self.projection = nn.Linear(old.in_features, m).to(old.weight)
            self.projection.weight.copy_(old.weight[:m])
            self.projection.bias.copy_(old.bias[:m])
        if self.id_embedding is not None:
            old = self.id_embedding
            self.id_embedding = nn.Embedding(old.num_embeddings, m, padding_idx=0).to(old.weight)
            self.id_embedding.weight.copy_(old.weight[:, :m])

    def forward(self) -> torch.Tensor:
        """Embeddings of all items, ``[n_items, hidden_size]``."""
        out = self.projection(self.features) if self.projection is not None else 0
        if self.id_embedding is not None:
            out = out + self.id_embedding.weight
        return out


class fMRLRec(SequentialRecommender):  # noqa: N801  (the paper's name; RecBole looks models up by it)
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = int(config["hidden_size"])
        self.mrl_sizes = check_sizes(config["mrl_sizes"], self.hidden_size)
        self.eval_size = self.mrl_sizes[size_index(self.mrl_sizes, config["eval_size"])]
        self.train_mode = config["train_mode"]
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode={self.train_mode!r}: use one of {TRAIN_MODES}.")
        self.register_buffer("size_weights", loss_weights(config, len(self.mrl_sizes)), persistent=False)

        modalities = as_list(config["modalities"])
        features = load_item_features(config, dataset, modalities) if modalities else {}
        self.item_tower = ItemTower(
            self.n_items,
            self.hidden_size,
            features,
            bool(config["use_id_embedding"]),
            bool(config["freeze_features"]),
        )
        self.emb_dropout = nn.Dropout(config["dropout_prob"])
        self.encoder = LRUEncoder(
            self.mrl_sizes,
            int(config["n_layers"]),
            dropout=config["dropout_prob"],
            attn_dropout=config["attn_dropout_prob"],
            r_min=config["r_min"],
            r_max=config["r_max"],
            bias=bool(config["use_bias"]),
        )

    def slice_(self, sizes: list[int]) -> None:
        """Become the size-``sizes[-1]`` model (its nested sub-modules slice themselves)."""
        self.hidden_size = sizes[-1]
        slice_protocol_(self, sizes)

    def encode(
        self, item_seq: torch.Tensor, items: torch.Tensor, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` of the (right-padded) sequences, given all item embeddings; with
        ``last``, only the state at that position of each row, ``[B, D]``."""
        x = self.emb_dropout(items[item_seq])
        return self.encoder(x, item_seq > 0, last)

    def forward(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state ``[B, D]``, all item embeddings ``[N, D]``)."""
        items = self.item_tower()
        return self.encode(item_seq, items, item_seq_len - 1), items

    def _nested_ce(self, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted mean over sizes of the full cross-entropy over all items."""
        losses = [
            F.cross_entropy(logits, targets) for logits in iter_nested_scores(query, items, self.mrl_sizes)
        ]
        return (torch.stack(losses) * self.size_weights).sum()

    def calculate_loss(self, interaction) -> torch.Tensor:
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        if self.train_mode == "prefix":
            query, items = self.forward(item_seq, item_seq_len)
            return self._nested_ce(query, items, pos_items)
        items = self.item_tower()
        hidden = self.encode(item_seq, items)
        # all_positions: next-item loss at every valid position of the window, one encoder pass.
        targets = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
        targets = targets.scatter(1, (item_seq_len - 1).unsqueeze(1), pos_items.unsqueeze(1))
        valid = torch.arange(item_seq.size(1), device=item_seq.device) < item_seq_len.unsqueeze(1)
        return self._nested_ce(hidden[valid], items, targets[valid])

    def full_sort_predict_sizes(self, interaction) -> torch.Tensor:
        """Scores over all items at every size, ``[K, B, n_items]``, from one encoder pass."""
        return torch.stack(list(self.iter_full_sort_predict_sizes(interaction)))

    def iter_full_sort_predict_sizes(self, interaction):
        """The same scores one size at a time, ``[B, n_items]`` each: no stacked copy for the evaluator."""
        query, items = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        yield from iter_size_scores(query, items, self.mrl_sizes)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        query, items = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        m = self.eval_size
        return query[:, :m] @ items[:, :m].T

    def predict(self, interaction) -> torch.Tensor:
        query, items = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        m = self.eval_size
        return (query[:, :m] * items[interaction[self.ITEM_ID], :m]).sum(dim=-1)
