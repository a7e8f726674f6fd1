import os

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
