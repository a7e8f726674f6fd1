"""Image features through any open_clip model; image references may be paths or URLs (downloaded once)."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl.errors import FeatureError
from recbole_fmrl.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)


def resolve_image(ref: str, data_dir: Path, download_dir: Path, timeout: float = 10.0) -> Path | None:
    """Local path of an image reference (downloading a URL once), or None when it cannot be had."""
    ref = ref.strip()
    if not ref:
        return None
    if ref.startswith(("http://", "https://")):
        target = download_dir / (hashlib.sha256(ref.encode()).hexdigest()[:24] + Path(ref).suffix[:5])
        if not target.is_file():
            try:
                with urllib.request.urlopen(ref, timeout=timeout) as resp:
                    data = resp.read()
            except OSError as err:
                logger.warning(f"image URL unreachable: {ref} ({err})")
                return None
            atomic_write_bytes(target, data)  # a torn download is never used
        return target
    path = Path(ref)
    path = path if path.is_absolute() else data_dir / path
    return path if path.is_file() else None


def is_random_init(pretrained: str | None) -> bool:
    return pretrained in (None, "", "none", "None")


def image_encoder_fn(name: str, pretrained: str | None, device: torch.device, missing: str, seed: int = 0):
    """Encoder of ``(item id, image path or None)`` pairs -> L2-normalised rows; missing/corrupt per
    ``image_missing``. Random weights (no ``pretrained``) are drawn from ``seed``, so every run that fills the
    cache gets the same encoder."""
    import open_clip
    from PIL import Image, UnidentifiedImageError

    if missing not in ("zero", "error"):
        raise FeatureError(f"image_missing={missing!r}: use 'zero' (zero vector, counted) or 'error'.")
    tag = None if is_random_init(pretrained) else pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
    except RuntimeError as err:
        raise FeatureError(
            f"open_clip could not build image_encoder={name!r} pretrained={pretrained!r}: {err}. Offline, pass "
            "a checkpoint path as image_pretrained, or image_pretrained=none for random weights."
        ) from err
    model.eval()
    dim = model.visual.output_dim
    stats = {"missing": 0}

    @torch.no_grad()
    def encode(items: Sequence[tuple[str, str | None, str]]) -> np.ndarray:
        out = np.zeros((len(items), dim), dtype=np.float32)
        tensors, rows = [], []
        for i, (item, p, ref) in enumerate(items):
            try:
                if p is None:
                    raise FileNotFoundError("no such file" if ref else "no image given")
                with Image.open(p) as img:
                    tensors.append(preprocess(img.convert("RGB")))
                rows.append(i)
            except (OSError, UnidentifiedImageError) as err:
                if missing == "error":
                    raise FeatureError(
                        f"item {item}: image {p or ref or '(none)'} cannot be read ({err}). Fix or remove it, or "
                        "set image_missing=zero to use a zero vector; chunks encoded so far are kept."
                    ) from None
                stats["missing"] += 1
        if tensors:
            emb = model.encode_image(torch.stack(tensors).to(device))
            out[rows] = torch.nn.functional.normalize(emb, dim=-1).float().cpu().numpy()
        return out

    encode.stats = stats
    return encode
