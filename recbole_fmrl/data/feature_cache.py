"""The on-disk feature cache: chunked, resumable, validated, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recbole_fmrl.errors import FeatureError
from recbole_fmrl.fileio import atomic_write

logger = logging.getLogger(__name__)


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


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
                atomic_write(chunk_file, lambda tmp, b=block: np.save(tmp, b), suffix=".npy")
            blocks.append(block)
            bar.update(end - start)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
    problem = _problem(matrix, len(ids))
    if problem:
        raise FeatureError(f"{desc}: the encoded matrix has {problem}; delete {partial} and encode again.")
    ids_array = np.asarray(ids, dtype=str)
    atomic_write(cache_file, lambda tmp: np.savez(tmp, features=matrix, ids=ids_array), suffix=".npz")
    shutil.rmtree(partial, ignore_errors=True)
    return matrix
