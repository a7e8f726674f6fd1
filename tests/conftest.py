import os
from pathlib import Path

import numpy as np
import pytest

import recbole_fmrl  # noqa: F401  (applies the compat fixes before any test imports RecBole)

# Tests never reach a model hub; the packaged MiniLM is found from site-packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temp dir so RecBole's log/ and saved/ folders land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


FAST = {
    "epochs": 1,
    "show_progress": False,
    "state": "WARNING",
    "train_batch_size": 512,
    "eval_batch_size": 512,
    "seed": 2020,
}


def random_text_features(folder: Path, dim: int) -> dict:
    """Random ``dim``-wide text features for mm-sample's items, saved in ``folder`` as a
    ``precomputed_features`` entry (no encoder run)."""
    item_file = Path(__file__).resolve().parents[1] / "dataset_atomic" / "mm-sample" / "mm-sample.item"
    tokens = [line.split("\t")[0] for line in item_file.read_text().splitlines()[1:] if line.strip()]
    np.save(folder / "f.npy", np.random.default_rng(0).normal(size=(len(tokens), dim)).astype(np.float32))
    (folder / "ids.txt").write_text("\n".join(tokens) + "\n")
    return {"text": {"path": str(folder / "f.npy"), "ids": str(folder / "ids.txt")}}
