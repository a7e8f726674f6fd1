"""Each test fails without its fix in recbole_fmrl/compat.py."""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import FAST
from recbole.data import create_dataset

from recbole_fmrl import compat
from recbole_fmrl.config import Config
from recbole_fmrl.quick_start import load_data_and_model, run_recbole_fmrl


def test_recbole_config_builds_on_numpy_2():
    config = Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert config["model"] == "BPR"
    assert np.float is np.float64 and np.unicode_ is np.str_  # RecBole's legacy aliases resolve
    assert np.bool is np.bool_  # numpy 2's own name is not overridden


def test_ray_tune_imports_on_numpy_2():
    from ray import tune

    assert np.bool8 is np.bool_
    assert tune.uniform(0, 1) is not None


def test_dok_update_matches_item_assignment():
    data = {(0, 1): 1.0, (2, 3): 2.0, (3, 0): 1.0}
    bulk = sp.dok_matrix((4, 4), dtype=np.float32)
    bulk._update(data)
    one_by_one = sp.dok_matrix((4, 4), dtype=np.float32)
    for key, value in data.items():
        one_by_one[key] = value
    assert (bulk.toarray() == one_by_one.toarray()).all()


def test_checkpoints_reload_resume_and_load_data_and_model(in_tmp):
    """Best-model reload (evaluate), resume and load_data_and_model all torch.load a pickled Config."""
    result = run_recbole_fmrl(
        "BPR", "mm-sample", config_dict={**FAST, "checkpoint_dir": str(in_tmp / "saved")}
    )
    model_file = result["saved_model_file"]
    assert result["test_result"]["ndcg@10"] >= 0

    config, model, _, train_data, _, test_data = load_data_and_model(model_file)
    state = torch.load(model_file, weights_only=False)["state_dict"]
    assert all(torch.equal(model.state_dict()[k].cpu(), v.cpu()) for k, v in state.items())

    from recbole_fmrl.utils import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.resume_checkpoint(model_file)
    assert trainer.start_epoch == 1
    again = trainer.evaluate(test_data, load_best_model=True, model_file=model_file)
    assert again["ndcg@10"] == pytest.approx(result["test_result"]["ndcg@10"])


class Payload:
    """A non-tensor object, as a RecBole checkpoint's pickled Config is."""


def test_untrusted_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"config": Payload(), "state_dict": {}}, path)
    with pytest.raises(pickle.UnpicklingError, match="trust_checkpoint"):
        compat.load_recbole_checkpoint(str(path))
    compat.trust_checkpoint(path)
    assert isinstance(compat.load_recbole_checkpoint(str(path))["config"], Payload)


def test_plain_weights_load_without_trust(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(compat.load_recbole_checkpoint(str(path))["w"], torch.ones(2))


def test_missing_values_are_filled_and_token_seq_loads(tmp_path, in_tmp):
    """pandas: RecBole's chained fillna and token_seq length agg need pandas-2 semantics (pinned <3)."""
    assert int(pd.__version__.split(".")[0]) < 3
    folder = tmp_path / "data" / "gaps"
    folder.mkdir(parents=True)
    (folder / "gaps.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        + "".join(f"u{u}\ti{(u + k) % 6}\t{k}\n" for u in range(6) for k in range(4))
    )
    (folder / "gaps.item").write_text(
        "item_id:token\ttags:token_seq\tbrand:token\tprice:float\n"
        "i0\ta b\tx\t1.0\n"
        "i1\t\t\t\n"
        "i2\tb c d\ty\t3.0\n"
        "i3\ta\tx\t2.0\n"
        "i4\tc\t\t\n"
        "i5\td a\ty\t6.0\n"
    )
    config = Config(
        model="BPR",
        dataset="gaps",
        config_dict={
            "data_path": str(tmp_path / "data"),
            "state": "WARNING",
            "normalize_all": False,
            "load_col": {
                "inter": ["user_id", "item_id", "timestamp"],
                "item": ["item_id", "tags", "brand", "price"],
            },
        },
    )
    dataset = create_dataset(config)
    items = dataset.item_feat
    i1 = dataset.token2id("item_id", "i1")
    assert items["brand"][i1].item() == 0  # missing token -> [PAD]
    assert items["price"][i1].item() == pytest.approx(3.0)  # missing float -> column mean
    assert (items["tags"][i1] == 0).all()  # missing token_seq -> empty (all padding)
    i2 = dataset.token2id("item_id", "i2")
    tags = [dataset.id2token("tags", t) for t in items["tags"][i2].tolist() if t != 0]
    assert tags == ["b", "c", "d"]


def test_coverage_and_popularity_metrics_run_in_recbole_own_trainer(in_tmp):
    metrics = ["Recall", "ItemCoverage", "AveragePopularity", "TailPercentage"]
    result = run_recbole_fmrl(
        "Pop",
        "mm-sample",
        config_dict={**FAST, "metrics": metrics, "valid_metric": "Recall@10", "checkpoint_dir": str(in_tmp)},
    )
    test = result["test_result"]
    assert 0 < test["itemcoverage@10"] <= 1 and test["averagepopularity@10"] > 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_names_the_python_versions_ray_2_6_3_installs_on(tmp_path):
    """pip would fail deep in the install on Python 3.12+ (no ray 2.6.3 wheel); make says it first."""
    newer = tmp_path / "python3.12"
    newer.write_text("#!/bin/sh\necho 3.12\n")
    newer.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    for python, ok in ((sys.executable, True), (str(newer), False)):
        run = subprocess.run(
            ["make", "-s", "python-check", f"PYTHON={python}"], cwd=root, capture_output=True, text=True
        )
        assert (run.returncode == 0) == ok, run.stderr
    assert "is Python 3.12; recbole-fmrl needs Python 3.10 or 3.11" in run.stderr
    assert 'requires-python = ">=3.10,<3.12"' in (root / "pyproject.toml").read_text()
