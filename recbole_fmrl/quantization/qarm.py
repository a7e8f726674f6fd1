"""QARM item codes for a RecBole dataset: features -> behaviour alignment -> RQ-Kmeans and VQ codes.

"QARM: Quantitative Alignment Multi-Modal Recommendation at Kuaishou" (arXiv 2411.11739). The aligned
features are cached like encoded features (keyed by the features, the training pairs and the alignment
settings); codes are recomputed from them (seconds, deterministic with ``seed``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recbole_fmrl.data.feature_cache import digest, read_cache
from recbole_fmrl.data.features import as_list, feature_cache_dir, load_item_features
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.fileio import atomic_write, atomic_write_lines
from recbole_fmrl.quantization.alignment import (
    item_cf_neighbours,
    neighbour_agreement,
    train_alignment,
    u2i_pairs,
    user_item_matrix,
)
from recbole_fmrl.quantization.codes import code_stats, rq_kmeans, vq_codes

CODE_KINDS = ("rq", "vq")
logger = logging.getLogger(__name__)


@dataclass
class ItemCodes:
    """Codes by internal item id (row 0 = padding): ``rq`` ``[n_items, L]`` in ``[0, C)`` (row 0 = -1),
    ``vq`` ``[n_items, k]`` internal item ids (row 0 = 0); ``aligned`` features ``[n_items, dim]``."""

    aligned: np.ndarray
    rq: np.ndarray | None
    vq: np.ndarray | None
    codebook_size: int
    report: dict = field(default_factory=dict)


def rq_codebook_size(config, n_items: int) -> int:
    """``qarm_rq_codebook``, or ~: min(256, items / 8), at least 2."""
    value = config["qarm_rq_codebook"]
    return max(2, min(256, (n_items - 1) // 8)) if value is None else value


def check_qarm_config(config) -> None:
    """Fail on bad QARM keys before any data is read."""
    kinds = as_list(config["qarm_codes"])
    if not kinds or any(k not in CODE_KINDS for k in kinds):
        raise ConfigError(f"qarm_codes={config['qarm_codes']!r} must list one or both of {list(CODE_KINDS)}.")
    for key, minimum in (
        ("qarm_rq_levels", 1),
        ("qarm_vq_k", 1),
        ("qarm_align_epochs", 1),
        ("qarm_align_batch_size", 2),
        ("qarm_i2i_neighbors", 0),
    ):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r} must be a whole number >= {minimum}.")
    codebook = config["qarm_rq_codebook"]
    if codebook is not None and (isinstance(codebook, bool) or not isinstance(codebook, int) or codebook < 2):
        raise ConfigError(f"qarm_rq_codebook={codebook!r} must be a whole number >= 2, or ~ for automatic.")
    for key in ("qarm_temperature", "qarm_align_lr"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key}={value!r} must be a positive number.")
    if not as_list(config["modalities"]):
        raise ConfigError(
            "QARM codes are computed from item features, and modalities is empty: list a modality "
            "(e.g. modalities: [text])."
        )


def aligned_features(config, dataset, features: np.ndarray) -> tuple[np.ndarray, dict]:
    """Behaviour-aligned features (cached) and a report: pairs, loss per epoch, neighbour agreement."""
    start = time.perf_counter()
    matrix = user_item_matrix(dataset)
    u2i = u2i_pairs(dataset, features)
    i2i = item_cf_neighbours(matrix, int(config["qarm_i2i_neighbors"]))
    pairs = np.concatenate([u2i, i2i]) if len(i2i) else u2i
    settings = {
        k: config[k]
        for k in (
            "qarm_align_epochs",
            "qarm_align_batch_size",
            "qarm_align_lr",
            "qarm_temperature",
            "qarm_i2i_neighbors",
            "seed",
        )
    }
    key = digest("qarm-align", _sha(features), _sha(pairs), settings)
    cache_file = feature_cache_dir(config) / f"qarm-aligned-{key}.npz"
    ids = [str(i) for i in range(len(features))]
    aligned = read_cache(cache_file, ids)
    if aligned is None:
        aligned, history = train_alignment(
            features,
            pairs,
            epochs=int(config["qarm_align_epochs"]),
            batch_size=int(config["qarm_align_batch_size"]),
            lr=float(config["qarm_align_lr"]),
            temperature=float(config["qarm_temperature"]),
            seed=int(config["seed"]),
        )
        # measured once, with the training: two all-pairs similarity passes a cached run does not repeat
        agreement = np.asarray([neighbour_agreement(features, matrix), neighbour_agreement(aligned, matrix)])
        atomic_write(
            cache_file,
            lambda tmp: np.savez(
                tmp, features=aligned, ids=np.asarray(ids), loss=np.asarray(history), agreement=agreement
            ),
            suffix=".npz",
        )
    else:  # the loss curve and the agreement are kept with the cache, for the report
        with np.load(cache_file, allow_pickle=False) as data:
            history = data["loss"].tolist() if "loss" in data else None
            agreement = data["agreement"] if "agreement" in data else [float("nan")] * 2
    report = {
        "u2i_pairs": int(len(u2i)),
        "i2i_pairs": int(len(i2i)),
        "align_loss_by_epoch": history,
        "align_cache": str(cache_file),
        "neighbour_agreement_raw": float(agreement[0]),
        "neighbour_agreement_aligned": float(agreement[1]),
        "align_seconds": round(time.perf_counter() - start, 2),
    }
    return aligned, report


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def item_codes(config, dataset) -> ItemCodes:
    """QARM codes of every item of ``dataset`` (RecBole's training split: the only data alignment sees)."""
    check_qarm_config(config)
    modalities = as_list(config["modalities"])
    features = load_item_features(config, dataset, modalities)
    x = np.concatenate([features[m].numpy() for m in modalities], axis=1).astype(np.float32)
    report: dict = {}
    if config["qarm_align"]:
        x, report = aligned_features(config, dataset, x)
    kinds = as_list(config["qarm_codes"])
    n_items = x.shape[0]
    codebook = rq_codebook_size(config, n_items)
    rq = vq = None
    if "rq" in kinds:
        start = time.perf_counter()
        result = rq_kmeans(x[1:], int(config["qarm_rq_levels"]), codebook, seed=int(config["seed"]))
        rq = np.vstack([np.full((1, result.codes.shape[1]), -1), result.codes])
        report["rq"] = {
            "levels": int(config["qarm_rq_levels"]),
            "codebook_size": codebook,
            "reconstruction_mse_by_level": result.errors,
            **code_stats(result.codes, codebook),
            "seconds": round(time.perf_counter() - start, 2),
        }
    if "vq" in kinds:
        start = time.perf_counter()
        neighbours = vq_codes(x[1:], int(config["qarm_vq_k"])) + 1
        vq = np.vstack([np.zeros((1, neighbours.shape[1]), dtype=np.int64), neighbours])
        report["vq"] = {
            "k": int(config["qarm_vq_k"]),
            **code_stats(np.sort(neighbours, axis=1)),
            "seconds": round(time.perf_counter() - start, 2),
        }
    logger.info(f"QARM codes: {report}")
    return ItemCodes(aligned=x, rq=rq, vq=vq, codebook_size=codebook, report=report)


def check_export_target(config, out_dir: str | Path) -> Path:
    """``<out_dir>/<dataset>``, refused when it is the dataset's own folder (its .item would be replaced)."""
    dst = Path(out_dir) / config["dataset"]
    if dst.resolve() == Path(config["data_path"]).resolve():
        raise ConfigError(
            f"--out {out_dir} holds the dataset itself ({dst}): writing there would replace its .item file; "
            "choose another --out."
        )
    return dst


def export_codes_atomic(config, dataset, codes: ItemCodes, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<dataset>/``: the dataset's ``.inter`` (and ``.user``) and an ``.item`` holding the
    item id and the codes as token_seq fields ``qarm_rq`` (``l<level>_<code>`` tokens) and ``qarm_vq``
    (neighbour item tokens), so any RecBole model can read them (e.g. SASRecF with ``selected_features:
    [qarm_rq]``). Only these columns: free-text item fields (Amazon titles with quotes) break RecBole's reader."""
    import shutil

    name = config["dataset"]
    src = Path(config["data_path"])  # RecBole's data_path already ends with the dataset's folder
    dst = check_export_target(config, out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    iid = dataset.iid_field
    tokens = dataset.field2id_token[iid]
    header = [f"{iid}:token"]
    columns = []
    if codes.rq is not None:
        header.append("qarm_rq:token_seq")
        columns.append([" ".join(f"l{lvl}_{c}" for lvl, c in enumerate(row)) for row in codes.rq])
    if codes.vq is not None:
        header.append("qarm_vq:token_seq")
        columns.append([" ".join(tokens[j] for j in row) for row in codes.vq])
    lines = ["\t".join(header) + "\n"]
    for i in range(1, len(tokens)):  # row 0 is RecBole's padding item
        lines.append("\t".join([tokens[i], *(column[i] for column in columns)]) + "\n")
    atomic_write_lines(dst / f"{name}.item", lines)
    for suffix in ("inter", "user"):
        path = src / f"{name}.{suffix}"
        if path.is_file():
            atomic_write(dst / path.name, lambda tmp, p=path: shutil.copyfile(p, tmp))
    return dst
