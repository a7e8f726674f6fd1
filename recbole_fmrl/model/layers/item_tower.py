"""Item towers of fMRLRec: what an item's embedding is made of. Shared by the input and the output side."""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from recbole_fmrl.errors import CheckpointError
from recbole_fmrl.model.abstract_recommender import slice_embedding

logger = logging.getLogger(__name__)


def features_digest(features: torch.Tensor) -> torch.Tensor:
    """SHA-256 of the features' float32 bytes, as 32 uint8 values (a state-dict buffer)."""
    data = features.detach().cpu().contiguous().float().numpy().tobytes()
    return torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8)


FEATURE_NORMS = ("none", "standardize")


def normalize_features(features: dict[str, torch.Tensor], norm: str) -> dict[str, torch.Tensor]:
    """``standardize``: each feature column to zero mean and unit variance over the items (row 0, the
    padding item, stays zero). Sentence encoders such as MiniLM L2-normalise their outputs (coordinates of
    about 1/sqrt(384) = 0.05), while an Adam step moves a trained feature by up to about the learning rate
    (1e-3 in the CPU profile): at unit scale the same steps change the table less, relative to its values,
    by one over each column's std. For frozen features it is an affine change of the projection's input,
    which its weights and bias could absorb; only the optimisation differs. Effects on Beauty:
    ``benchmarks/MEASURED.md``."""
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm={norm!r} is not one of {list(FEATURE_NORMS)}")
    if norm == "none":
        return features
    out = {}
    for name, table in features.items():
        table = table.float()
        rows = table[1:]
        # One item has no sample std (NaN): its column is constant, and constant columns become zeros.
        std = rows.std(0) if rows.size(0) > 1 else torch.zeros_like(rows[0])
        scaled = (table - rows.mean(0)) / std.clamp_min(1e-12)
        scaled[0] = 0
        out[name] = scaled
    return out


class FeatureMismatchError(CheckpointError):
    """A checkpoint was trained on other frozen item features than the ones loaded now."""


class ItemTower(nn.Module):
    """Item embedding = projection(concat of modality features) [+ projection of a trained copy of them]
    [+ ID embedding]; used for input and output.

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
        allow_empty: bool = False,
        train_feature_copy: bool = False,
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
        self.feature_copy = self.copy_projection = None
        if train_feature_copy:
            # Frozen features as a fixed anchor of item similarity, and a trained copy initialised from the
            # same features that learns what they miss: the structure of frozen features + ID embedding,
            # with the per-item trained part starting from the item's text instead of noise.
            if not features or not freeze_features:
                raise ValueError(
                    "train_feature_copy: True adds a trained copy beside frozen features: it needs "
                    "modalities and freeze_features: True (with freeze_features: False the features are "
                    "trained already)."
                )
            self.feature_copy = nn.Parameter(stacked.clone())
            self.copy_projection = nn.Linear(stacked.size(1), hidden_size, bias=False)
        self.id_embedding = None
        if use_id_embedding:  # RecBole's init N(0, 0.02) with a zero padding row; N(0, 1) gives a CE of ~85
            self.id_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
            with torch.no_grad():
                self.id_embedding.weight.normal_(0.0, 0.02)
                self.id_embedding.weight[0].zero_()
        if self.projection is None and self.id_embedding is None and not allow_empty:
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
                    "another feature cache, encoder, text_fields, feature_seed or feature_norm. Use the settings "
                    "and cache it was trained with, or retrain."
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # An export folds trained features into one [n_items, m] table (see ``folds_on_export``).
    FOLD_TRAINED_FEATURES = True

    @property
    def folds_on_export(self) -> bool:
        """Trained features (``freeze_features: False``, or ``train_feature_copy``) are per-item parameters
        as wide as the features: a size-m export keeps only the item embeddings' first m columns, as an
        ID-embedding table of width m."""
        trained = isinstance(getattr(self, "features", None), nn.Parameter) or self.feature_copy is not None
        return self.FOLD_TRAINED_FEATURES and trained

    def trained_feature_tables(self) -> list[nn.Parameter]:
        """The per-item feature tables being trained (``freeze_features: False``, ``train_feature_copy``):
        the parameters ``feature_lr_scale`` applies to."""
        tables = [getattr(self, "features", None), self.feature_copy]
        return [t for t in tables if isinstance(t, nn.Parameter) and t.requires_grad]

    @torch.no_grad()
    def slice_(self, sizes: list[int]) -> None:
        m = sizes[-1]
        if self.folds_on_export:
            table = self.forward()[:, :m]
            del self.features
            if hasattr(self, "features_digest"):  # the folded table no longer reads the frozen features
                del self.features_digest
            self.projection, self.modalities = None, []
            self.feature_copy = self.copy_projection = None
            self.id_embedding = nn.Embedding(table.size(0), m, padding_idx=0).to(table)
            self.id_embedding.weight.copy_(table)
            return
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
        if self.feature_copy is not None:
            out = out + self.copy_projection(self.feature_copy)
        if self.id_embedding is not None:
            out = out + self.id_embedding.weight
        return out


class QARMItemTower(ItemTower):
    """QARM item embedding: trainable embeddings of the item's quantitative codes, summed (RQ-Kmeans levels)
    and averaged (VQ neighbours), [+ projection of the aligned feature] [+ ID embedding].

    Every part is a lookup or a linear map whose output coordinate j reads column j (or output row j) only,
    so a prefix of size m of the item embedding is the size-m tower's: export slices columns. Codes are
    persistent buffers, so a checkpoint scores with the codes it was trained with.
    """

    # Its export rebuilds the codes from the config, so the aligned feature stays a feature.
    FOLD_TRAINED_FEATURES = False

    def __init__(
        self,
        n_items: int,
        hidden_size: int,
        features: dict[str, torch.Tensor],
        use_id_embedding: bool,
        freeze_features: bool,
        rq_codes: torch.Tensor | None,
        codebook_size: int,
        vq_codes: torch.Tensor | None,
    ):
        super().__init__(n_items, hidden_size, features, use_id_embedding, freeze_features, allow_empty=True)
        self.rq_bag = self.vq_bag = None
        if rq_codes is not None:  # level l, code c -> row 1 + l*C + c of one table; padding item -> row 0
            levels = rq_codes.shape[1]
            offsets = 1 + codebook_size * torch.arange(levels)
            index = torch.where(rq_codes >= 0, rq_codes + offsets, torch.zeros_like(rq_codes))
            self.register_buffer("rq_index", index.long())
            self.rq_bag = self._bag(1 + levels * codebook_size, hidden_size, "sum")
        if vq_codes is not None:  # neighbour item ids; the padding item's row is all padding
            self.register_buffer("vq_index", vq_codes.long())
            self.vq_bag = self._bag(n_items, hidden_size, "mean")
        if (
            self.rq_bag is None
            and self.vq_bag is None
            and self.projection is None
            and self.id_embedding is None
        ):
            raise ValueError("the QARM item tower needs codes, features or an ID embedding.")

    @staticmethod
    def _bag(rows: int, dim: int, mode: str) -> nn.EmbeddingBag:
        bag = nn.EmbeddingBag(rows, dim, mode=mode, padding_idx=0)
        with torch.no_grad():
            bag.weight.normal_(0.0, 0.02)
            bag.weight[0].zero_()
        return bag

    @torch.no_grad()
    def slice_(self, sizes: list[int]) -> None:
        super().slice_(sizes)
        m = sizes[-1]
        for name in ("rq_bag", "vq_bag"):
            old = getattr(self, name)
            if old is not None:
                new = nn.EmbeddingBag(old.num_embeddings, m, mode=old.mode, padding_idx=old.padding_idx)
                new = new.to(old.weight)
                new.weight.copy_(old.weight[:, :m])
                setattr(self, name, new)

    def forward(self) -> torch.Tensor:
        out = super().forward()
        if self.rq_bag is not None:
            out = out + self.rq_bag(self.rq_index)
        if self.vq_bag is not None:
            out = out + self.vq_bag(self.vq_index)
        return out
