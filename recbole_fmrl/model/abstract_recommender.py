"""The Matryoshka protocol every nested model of the plugin speaks, in one place.

A nested model has sizes m_1 < ... < m_K = D (``mrl_sizes``) and serves ``eval_size`` through RecBole's
``full_sort_predict``/``predict``. It yields its scores at every size from one encoder pass
(``score_operands``, ``iter_full_sort_predict_sizes``), cuts itself to a prefix of sizes in place (``slice_``, used by the
sub-model export), and says which config keys rebuild that smaller model (``submodel_config``). The
evaluator, the exporter and the cost report rely on this protocol only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.layers.matryoshka import iter_size_scores, nesting_from_config

EVAL_SCORINGS = ("fused", "exact")  # how the all-sizes evaluator builds each size's scores (mrl_eval_scoring)


class MatryoshkaRecommender:
    """Mixin for a RecBole recommender whose every prefix of size m_k is itself a complete model.

    ``SIZE_KEY`` names the config key of D (``hidden_size`` for fMRLRec, ``embedding_size`` for MRL4Rec).
    Subclasses implement ``score_operands``; everything else here is shared.
    """

    SIZE_KEY = "hidden_size"

    @classmethod
    def check_config(cls, config) -> None:
        """Fail on a bad value before any data is loaded (the plugin's Config calls this); extend it."""
        nesting_from_config(config, cls.SIZE_KEY)
        scoring = config["mrl_eval_scoring"]
        if scoring is not None and scoring not in EVAL_SCORINGS:
            raise ConfigError(
                f"mrl_eval_scoring={scoring!r} is not one of {', '.join(EVAL_SCORINGS)} (fused: each size adds "
                "one block to the last size's scores; exact: each size's own GEMM, as its export computes it)."
            )

    def init_nesting(self, config) -> None:
        """Check ``config``, then read D, the sizes, eval_size and loss weights (errors name the keys)."""
        self.check_config(config)
        setattr(self, self.SIZE_KEY, int(config[self.SIZE_KEY]))
        self.mrl_sizes, self.eval_size, weights = nesting_from_config(config, self.SIZE_KEY)
        self.register_buffer("size_weights", weights, persistent=False)

    def slice_(self, sizes: list[int]) -> None:
        """Become the size-``sizes[-1]`` model: the model's own tensors here, nested sub-modules by theirs."""
        setattr(self, self.SIZE_KEY, sizes[-1])
        self.mrl_sizes = list(sizes)
        self.eval_size = self.eval_size if self.eval_size in sizes else sizes[-1]
        weights = self.size_weights[: len(sizes)]
        self.size_weights = weights / weights.sum()

    def submodel_config(self, size: int) -> dict:
        """Config keys that make ``load_data_and_model`` build this model's size-``size`` export."""
        kept = [s for s in self.mrl_sizes if s <= size]
        return {
            self.SIZE_KEY: size,
            "mrl_sizes": kept,
            "eval_size": self.eval_size if self.eval_size in kept else size,
        }

    def score_operands(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-size query ``[B, D]`` and item ``[n_items, D]`` representations of one encoder pass:
        size m's scores are ``query[:, :m] @ items[:, :m].T``. Subclasses implement this."""
        raise NotImplementedError

    def iter_full_sort_predict_sizes(self, interaction, reuse: bool = False) -> Iterator[torch.Tensor]:
        """Scores over all items at each size in turn, ``[B, n_items]``, from one encoder pass, as each
        size's export computes them; with ``reuse``, one buffer overwritten per size (a consumer that is done
        with each size before the next saves an allocation per size)."""
        query, items = self.score_operands(interaction)
        yield from iter_size_scores(query, items, self.mrl_sizes, reuse)

    def full_sort_predict_sizes(self, interaction) -> torch.Tensor:
        """Scores over all items at every size, ``[K, B, n_items]``."""
        return torch.stack(list(self.iter_full_sort_predict_sizes(interaction)))


def require_int(config, key: str, minimum: int, meaning: str) -> int:
    """``config[key]`` as a whole number >= ``minimum``, or a ``ConfigError`` naming the key."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be a whole number >= {minimum} ({meaning}).")
    return value


def speaks_matryoshka(model: nn.Module) -> bool:
    """Whether ``model`` is a nested model the evaluator and exporter can handle."""
    return isinstance(model, MatryoshkaRecommender)


def slice_embedding(old: nn.Embedding, m: int) -> nn.Embedding:
    """An ``nn.Embedding`` with the first ``m`` columns of ``old`` (same rows and padding index)."""
    new = nn.Embedding(old.num_embeddings, m, padding_idx=old.padding_idx).to(old.weight)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, :m])
    return new
