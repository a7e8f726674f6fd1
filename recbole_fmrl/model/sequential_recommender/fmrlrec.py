"""fMRLRec: multimodal item tower + nested LRU encoder trained at every Matryoshka size at once.

"Train Once, Deploy Anywhere: Matryoshka Representation Learning for Multimodal Recommendation"
(EMNLP 2024 Findings). Any prefix of size m_k of the hidden state is itself a complete model of size m_k.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_fmrl.data.features import MODALITIES, as_list, load_item_features
from recbole_fmrl.errors import CheckpointError, ConfigError
from recbole_fmrl.model.abstract_recommender import MatryoshkaRecommender, require_int, slice_embedding
from recbole_fmrl.model.layers.lru import LRUEncoder
from recbole_fmrl.model.layers.matryoshka import iter_size_scores
from recbole_fmrl.model.layers.nested_loss import nested_cross_entropy
from recbole_fmrl.trainer import SCHEDULES

TRAIN_MODES = ("prefix", "all_positions")
logger = logging.getLogger(__name__)


class FeatureMismatchError(CheckpointError):
    """A checkpoint was trained on other frozen item features than the ones loaded now."""


def features_digest(features: torch.Tensor) -> torch.Tensor:
    """SHA-256 of the features' float32 bytes, as 32 uint8 values (a state-dict buffer)."""
    data = features.detach().cpu().contiguous().float().numpy().tobytes()
    return torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8)


class ItemTower(nn.Module):
    """Item embedding = projection(concat of modality features) [+ ID embedding]; used for input and output.

    Frozen features are a non-persistent buffer: checkpoints stay small and reload them from the feature
    cache. Their digest is saved instead and checked on load, so a checkpoint never silently scores with
    other features (another cache, encoder or seed). Trainable features are a parameter and are saved.
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
                self.register_buffer("features_digest", features_digest(stacked))
            else:
                self.features = nn.Parameter(stacked)
            self.projection = nn.Linear(stacked.size(1), hidden_size)
        self.id_embedding = None
        if use_id_embedding:  # RecBole's init N(0, 0.02) with a zero padding row; N(0, 1) gives a CE of ~85
            self.id_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
            with torch.no_grad():
                self.id_embedding.weight.normal_(0.0, 0.02)
                self.id_embedding.weight[0].zero_()
        if self.projection is None and self.id_embedding is None:
            raise ValueError("fMRLRec needs item features (modalities) or use_id_embedding: True.")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "features_digest"
        if hasattr(self, "features_digest"):
            theirs = state_dict.get(key)
            if theirs is None:
                logger.warning(
                    "checkpoint has no item-feature digest (saved before digests): cannot check features"
                )
                state_dict[key] = self.features_digest
            elif not torch.equal(theirs.cpu(), self.features_digest.cpu()):
                raise FeatureMismatchError(
                    "the checkpoint was trained on other item features than this run loaded (digest "
                    f"{bytes(theirs.tolist()).hex()[:12]} vs {bytes(self.features_digest.tolist()).hex()[:12]}): "
                    "another feature cache, encoder, text_fields or feature_seed. Use the settings and cache it was "
                    "trained with, or retrain."
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def slice_(self, sizes: list[int]) -> None:
        m = sizes[-1]
        if self.projection is not None:
            old = self.projection
            self.projection = nn.Linear(old.in_features, m).to(old.weight)
            self.projection.weight.copy_(old.weight[:m])
            self.projection.bias.copy_(old.bias[:m])
        if self.id_embedding is not None:
            self.id_embedding = slice_embedding(self.id_embedding, m)

    def forward(self) -> torch.Tensor:
        """Embeddings of all items, ``[n_items, hidden_size]``."""
        out = self.projection(self.features) if self.projection is not None else 0
        if self.id_embedding is not None:
            out = out + self.id_embedding.weight
        return out


class fMRLRec(MatryoshkaRecommender, SequentialRecommender):  # noqa: N801  (the paper's name)
    """Multimodal item tower + nested LRU encoder, trained with cross-entropy at every size at once.

    Items are ``projection(features)`` (+ an optional ID embedding), shared by input and output. The encoder's
    every prefix of size m_k depends only on the first m_k input coordinates, so the size-m_k scores equal a
    standalone size-m_k model's (the sub-model export).
    """

    input_type = InputType.POINTWISE  # SIZE_KEY: hidden_size (the protocol's default)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config["train_mode"] not in TRAIN_MODES:
            raise ConfigError(f"train_mode={config['train_mode']!r} is not valid: use one of {TRAIN_MODES}.")
        precomputed = config["precomputed_features"] or {}
        if not isinstance(precomputed, dict):
            raise ConfigError(
                f"precomputed_features={precomputed!r} must be a mapping {{modality: {{path: x.npy, ids: ids.txt}}}} "
                "or {modality: preload field name}."
            )
        modalities = as_list(config["modalities"])
        unknown = [m for m in modalities if m not in MODALITIES and m not in precomputed]
        if unknown:
            raise ConfigError(
                f"modalities {unknown} have no features: encodable ones are {list(MODALITIES)}; give others "
                "under precomputed_features."
            )
        if not modalities and not config["use_id_embedding"]:
            raise ConfigError(
                "modalities is empty and use_id_embedding is False: the items have no representation; "
                "list a modality or set use_id_embedding=True."
            )
        for key in ("dropout_prob", "attn_dropout_prob"):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{key}={value!r} must be a number in [0, 1).")
        require_int(config, "n_layers", 1, "LRU blocks")
        require_int(config, "warmup_steps", 0, "optimizer steps of linear warm-up")
        if config["loss_chunk_size"] is not None:
            require_int(config, "loss_chunk_size", 1, "rows per chunk of the fused loss; ~ = auto")
        if config["lr_scheduler"] not in SCHEDULES:
            raise ConfigError(
                f"lr_scheduler={config['lr_scheduler']!r} is not valid: use one of {SCHEDULES}."
            )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.init_nesting(config)
        self.train_mode = config["train_mode"]
        self.loss_chunk_size = config["loss_chunk_size"]

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

    def encode(
        self, item_seq: torch.Tensor, items: torch.Tensor, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states at the items of the (right-padded) sequences, packed row-major as
        ``item_seq[item_seq > 0]``, ``[V, D]``; with ``last``, only the state at that position of each row,
        ``[B, D]``. Columns past the longest sequence are trimmed and padded positions are never encoded."""
        mask = item_seq > 0
        width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        mask = mask[:, :width]
        x = self.emb_dropout(items[item_seq[:, :width][mask]])
        return self.encoder.forward_packed(x, mask, last)

    def forward(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state ``[B, D]``, all item embeddings ``[N, D]``)."""
        items = self.item_tower()
        return self.encode(item_seq, items, item_seq_len - 1), items

    def _nested_ce(self, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted mean over sizes of the full cross-entropy over all items (fused, chunked over rows)."""
        return nested_cross_entropy(
            query, items, targets, self.mrl_sizes, self.size_weights, self.loss_chunk_size
        )

    def calculate_loss(self, interaction) -> torch.Tensor:
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        if self.train_mode == "prefix":
            query, items = self.forward(item_seq, item_seq_len)
            return self._nested_ce(query, items, pos_items)
        items = self.item_tower()
        hidden = self.encode(item_seq, items)  # [V, D] at the items of item_seq, packed
        # all_positions: next-item loss at every valid position of the window, one encoder pass.
        targets = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
        targets = targets.scatter(1, (item_seq_len - 1).unsqueeze(1), pos_items.unsqueeze(1))
        return self._nested_ce(hidden, items, targets[item_seq > 0])

    def iter_full_sort_predict_sizes(self, interaction):
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
