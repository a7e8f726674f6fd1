"""fMRLRec: multimodal item tower + nested LRU encoder trained at every Matryoshka size at once.

"Train Once, Deploy Anywhere: Matryoshka Representation Learning for Multimodal Recommendation"
(EMNLP 2024 Findings). Any prefix of size m_k of the hidden state is itself a complete model of size m_k.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_fmrl.data.features import MODALITIES, as_list, load_item_features
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.abstract_recommender import MatryoshkaRecommender, require_int
from recbole_fmrl.model.layers.item_tower import (  # noqa: F401  (FeatureMismatchError: public import)
    FEATURE_NORMS,
    FeatureMismatchError,
    ItemTower,
    QARMItemTower,
    normalize_features,
)
from recbole_fmrl.model.layers.lru import LRUEncoder
from recbole_fmrl.model.layers.nested_loss import nested_cross_entropy
from recbole_fmrl.model.layers.packed import PackedEncoder
from recbole_fmrl.trainer import SCHEDULES

TRAIN_MODES = ("prefix", "all_positions")
ITEM_TOWERS = ("features", "qarm")
ENCODERS = ("lru", "mamba")


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
        if config["encoder"] not in ENCODERS:
            raise ConfigError(f"encoder={config['encoder']!r} is not valid: use one of {ENCODERS}.")
        if config["encoder"] == "mamba":
            from recbole_fmrl.model.layers.mamba import check_mamba_impl

            check_mamba_impl(config["mamba_impl"], config["device"])
            for key in ("mamba_d_state", "mamba_d_conv", "mamba_expand"):
                require_int(config, key, 1, "Mamba encoder setting")
            if config["mamba_chunk"] is not None:
                require_int(config, "mamba_chunk", 1, "time steps per chunk of the PyTorch scan; ~ = auto")
        if config["item_tower"] not in ITEM_TOWERS:
            raise ConfigError(f"item_tower={config['item_tower']!r} is not valid: use one of {ITEM_TOWERS}.")
        norm = config["feature_norm"] or "none"
        if norm not in FEATURE_NORMS:
            raise ConfigError(f"feature_norm={norm!r} is not valid: use one of {list(FEATURE_NORMS)}.")
        if norm != "none" and config["item_tower"] != "features":
            raise ConfigError(
                f"feature_norm={norm!r} applies to item_tower: features only (QARM codes are built from the "
                "aligned features as they are): set feature_norm: none."
            )
        if config["item_tower"] == "qarm":
            from recbole_fmrl.quantization.qarm import check_qarm_config

            check_qarm_config(config)
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
        if config["train_feature_copy"] and (
            not modalities or not config["freeze_features"] or config["item_tower"] != "features"
        ):
            raise ConfigError(
                "train_feature_copy=True trains a copy of the item features beside the frozen ones: it needs "
                "item_tower: features, a modality and freeze_features=True (with freeze_features=False the "
                "features are trained already); or set train_feature_copy=False."
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
        scale = config["feature_lr_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(
                f"feature_lr_scale={scale!r} must be a number > 0 (a multiple of learning_rate); to keep the "
                "features fixed set freeze_features=True."
            )
        if scale != 1 and str(config["learner"]).lower() not in ("adam", "adamw"):
            raise ConfigError(
                f"feature_lr_scale={scale!r} needs learner adam or adamw (learner={config['learner']!r} "
                "trains every parameter at one rate): change the learner, or set feature_lr_scale=1.0."
            )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.init_nesting(config)
        self.train_mode = config["train_mode"]
        self.loss_chunk_size = config["loss_chunk_size"]

        self.item_tower = self.build_item_tower(config, dataset)
        self.emb_dropout = nn.Dropout(config["dropout_prob"])
        self.encoder = self.build_encoder(config)

    def build_encoder(self, config) -> PackedEncoder:
        """``encoder: lru`` (the paper's) or ``mamba`` (nested Mamba4Rec-style blocks); both nest exactly."""
        common = {
            "dropout": config["dropout_prob"],
            "attn_dropout": config["attn_dropout_prob"],
            "bias": bool(config["use_bias"]),
        }
        if config["encoder"] == "mamba":
            from recbole_fmrl.model.layers.mamba import MambaEncoder

            return MambaEncoder(
                self.mrl_sizes,
                int(config["n_layers"]),
                d_state=int(config["mamba_d_state"]),
                d_conv=int(config["mamba_d_conv"]),
                expand=int(config["mamba_expand"]),
                impl=config["mamba_impl"],
                chunk=config["mamba_chunk"],
                **common,
            )
        return LRUEncoder(
            self.mrl_sizes, int(config["n_layers"]), r_min=config["r_min"], r_max=config["r_max"], **common
        )

    def trained_feature_tables(self) -> list[nn.Parameter]:
        """The item tower's trained feature tables, which the trainer gives ``feature_lr_scale``."""
        return self.item_tower.trained_feature_tables()

    def build_item_tower(self, config, dataset) -> ItemTower:
        """``item_tower: features``: projected frozen features [+ ID]; ``qarm``: QARM codes' embeddings
        [+ projected aligned features, ``qarm_use_feature``] [+ ID]."""
        use_id, freeze = bool(config["use_id_embedding"]), bool(config["freeze_features"])
        if config["item_tower"] == "qarm":
            from recbole_fmrl.quantization.qarm import item_codes

            codes = item_codes(config, dataset)  # its report is logged there
            features = {"aligned": torch.from_numpy(codes.aligned)} if config["qarm_use_feature"] else {}
            return QARMItemTower(
                self.n_items,
                self.hidden_size,
                features,
                use_id,
                freeze,
                None if codes.rq is None else torch.from_numpy(codes.rq),
                codes.codebook_size,
                None if codes.vq is None else torch.from_numpy(codes.vq),
            )
        modalities = as_list(config["modalities"])
        features = load_item_features(config, dataset, modalities) if modalities else {}
        features = normalize_features(features, config["feature_norm"] or "none")
        copy = bool(config["train_feature_copy"])
        return ItemTower(self.n_items, self.hidden_size, features, use_id, freeze, train_feature_copy=copy)

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

    def submodel_config(self, size: int) -> dict:
        """With trained features the export's item tower is one folded table (``ItemTower.slice_``)."""
        keys = super().submodel_config(size)
        if self.item_tower.folds_on_export:
            keys.update({"modalities": [], "use_id_embedding": True, "train_feature_copy": False})
        return keys

    def score_operands(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def full_sort_predict(self, interaction) -> torch.Tensor:
        query, items = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        m = self.eval_size
        return query[:, :m] @ items[:, :m].T

    def predict(self, interaction) -> torch.Tensor:
        query, items = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        m = self.eval_size
        return (query[:, :m] * items[interaction[self.ITEM_ID], :m]).sum(dim=-1)
