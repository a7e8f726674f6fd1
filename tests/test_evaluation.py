"""Matryoshka evaluator and sub-model export, end to end through checkpoints."""

import csv
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, random_text_features
from hypothesis import given, settings
from hypothesis import strategies as st
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer

from recbole_fmrl.cli import export as export_cli
from recbole_fmrl.cli.evaluate import main as evaluation_cli
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.evaluation import evaluate as evaluate_module
from recbole_fmrl.evaluation import evaluate_all_sizes
from recbole_fmrl.evaluation import topk as topk_module
from recbole_fmrl.evaluation.evaluate import _Positives, fused_size_scores
from recbole_fmrl.quick_start import load_data_and_model, run_recbole_fmrl
from recbole_fmrl.submodel.checkpoint import CheckpointMismatchError, check_fits, read_portable

SIZES = [8, 16, 32]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(out)
    try:
        result = run_recbole_fmrl(
            "fMRLRec",
            "mm-sample",
            config_dict={
                **FAST,
                "epochs": 2,
                "modalities": [],
                "use_id_embedding": True,
                "hidden_size": 32,
                "mrl_sizes": SIZES,
                "checkpoint_dir": str(out),
                "learning_rate": 0.003,
            },
        )
    finally:
        os.chdir(cwd)
    return result, out


def test_each_size_equals_a_separate_recbole_evaluation(trained):
    result, _ = trained
    config, model, _, train_data, _, test_data = load_data_and_model(result["saved_model_file"])
    for size in SIZES:
        model.eval_size = size
        trainer = Trainer(config, model)  # RecBole's own evaluation path, one size
        trainer.eval_collector.data_collect(train_data)
        separate = trainer.evaluate(test_data, load_best_model=False)
        assert dict(separate) == dict(result["test_result_by_size"][size])


def test_run_writes_table_files(trained):
    result, out = trained
    stem = out / f"{Path(result['saved_model_file']).stem}-test-sizes"
    rows = list(csv.DictReader(open(f"{stem}.csv")))
    assert [int(r["size"]) for r in rows] == SIZES
    assert {"ndcg@10", "params_encoder", "params_item_tower", "latency_ms_per_batch"} <= set(rows[0])
    assert Path(f"{stem}.png").stat().st_size > 1000
    assert [int(r["params_encoder"]) for r in rows] == sorted(int(r["params_encoder"]) for r in rows)


def test_valid_by_size_is_the_best_checkpoint_on_valid(trained):
    """Every size on valid, at the checkpoint that early stopping kept: the full size is the trainer's own
    best valid result, so a size can be chosen on valid without looking at the test set."""
    result, out = trained
    by_size = result["valid_result_by_size"]
    assert list(by_size) == SIZES
    assert dict(by_size[SIZES[-1]]) == dict(result["best_valid_result"])
    assert by_size[SIZES[0]] != by_size[SIZES[-1]]
    stem = out / f"{Path(result['saved_model_file']).stem}-valid-sizes"
    rows = list(csv.DictReader(open(f"{stem}.csv")))
    assert [int(r["size"]) for r in rows] == SIZES and "latency_ms_per_batch" not in rows[0]
    assert json.load(open(f"{stem}.json"))["split"] == "valid"


def test_exported_submodel_file_roundtrip(trained, tmp_path, monkeypatch):
    result, _ = trained
    monkeypatch.setattr(sys, "argv", ["export"])
    full_bytes = os.path.getsize(result["saved_model_file"])
    sizes_on_disk = []
    for size in SIZES:
        path = tmp_path / f"sub{size}.pth"
        assert (
            export_cli.main(
                [f"--model_file={result['saved_model_file']}", f"--size={size}", f"--output={path}"]
            )
            == 0
        )
        assert read_portable(path) is not None  # plain data + tensors: loads with weights_only=True
        sizes_on_disk.append(path.stat().st_size)
    assert sizes_on_disk == sorted(sizes_on_disk) and sizes_on_disk[-1] < full_bytes

    _, nested, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    config, small, _, train_data, _, _ = load_data_and_model(str(tmp_path / "sub16.pth"))
    assert small.hidden_size == 16 and small.mrl_sizes == [8, 16]
    nested.eval()
    for k, size in enumerate(SIZES):  # every size: same top-10 for every test user, scores up to rounding
        _, sub, *_ = load_data_and_model(str(tmp_path / f"sub{size}.pth"))
        sub.eval()
        with torch.no_grad():
            for batch, *_ in test_data:
                expected = nested.full_sort_predict_sizes(batch)[k]
                got = sub.full_sort_predict(batch)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                assert torch.equal(got.topk(10).indices, expected.topk(10).indices)
    trainer = Trainer(config, small)  # RecBole's plain Trainer loads and evaluates the exported file
    trainer.eval_collector.data_collect(train_data)
    plain = trainer.evaluate(test_data, load_best_model=True, model_file=str(tmp_path / "sub16.pth"))
    assert dict(plain) == pytest.approx(dict(result["test_result_by_size"][16]), abs=1e-4)


def test_checkpoint_of_wrong_size_or_model_is_rejected_clearly(trained, tmp_path, monkeypatch):
    result, _ = trained
    monkeypatch.setattr(sys, "argv", ["export"])
    export_cli.main(
        [f"--model_file={result['saved_model_file']}", "--size=8", f"--output={tmp_path / 's8.pth'}"]
    )
    _, full, *_ = load_data_and_model(result["saved_model_file"])
    with pytest.raises(CheckpointMismatchError, match="different sizes"):
        check_fits(full, read_portable(tmp_path / "s8.pth")["state_dict"], "s8.pth")
    with pytest.raises(CheckpointMismatchError, match="another model type"):
        check_fits(full, {"user_embedding.weight": torch.zeros(3, 8)}, "bpr.pth")


def test_export_of_a_size_not_in_the_nesting_fails(trained, tmp_path, monkeypatch, capsys):
    result, _ = trained
    monkeypatch.setattr(sys, "argv", ["export"])
    assert (
        export_cli.main(
            [f"--model_file={result['saved_model_file']}", "--size=12", f"--output={tmp_path / 'x.pth'}"]
        )
        == 2
    )
    assert "size=12 is not one of the model's mrl_sizes [8, 16, 32]" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_evaluation_cli_reevaluates_a_checkpoint(trained, tmp_path, monkeypatch, capsys):
    result, _ = trained
    monkeypatch.setattr(sys, "argv", ["evaluation"])
    assert evaluation_cli([f"--model_file={result['saved_model_file']}", f"--out_dir={tmp_path}"]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    assert (tmp_path / f"{Path(result['saved_model_file']).stem}-test-reeval-sizes.json").is_file()


def test_non_nested_model_is_refused(in_tmp):
    result = run_recbole_fmrl("Pop", "mm-sample", config_dict={**FAST, "checkpoint_dir": str(in_tmp)})
    assert "test_result_by_size" not in result
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    with pytest.raises(ConfigError, match="Pop is not a nested \\(Matryoshka\\) model"):
        evaluate_all_sizes(Trainer(config, model), test_data)


EVERY_METRIC_FAMILY = [
    "Recall", "MRR", "NDCG", "Hit", "MAP", "Precision",  # rec.topk
    "GAUC",  # rec.meanrank, through RecBole's own collector
    "ItemCoverage", "AveragePopularity", "GiniIndex", "ShannonEntropy", "TailPercentage",  # rec.items
]  # fmt: skip


@pytest.mark.parametrize("block_topk", [False, True], ids=["small-catalogue", "block-topk"])
def test_every_metric_family_and_topk_equals_separate_evaluations(trained, block_topk, monkeypatch):
    """Each size's metrics equal RecBole's own evaluation of that size, with torch.topk (mm-sample is below
    the block top-k's catalogue threshold) and with the strided-block top-k forced on."""
    if block_topk:
        monkeypatch.setattr(topk_module, "_MIN_ITEMS", 0)
    result, _ = trained
    config, model, _, train_data, _, test_data = load_data_and_model(result["saved_model_file"])
    config["metrics"], config["topk"] = EVERY_METRIC_FAMILY, [3, 10]
    trainer = Trainer(config, model)
    trainer.eval_collector.data_collect(train_data)
    by_size = evaluate_all_sizes(trainer, test_data)
    assert {"gauc", "itemcoverage@10", "tailpercentage@3", "map@10"} <= set(by_size[8])
    for size in SIZES:
        model.eval_size = size
        separate = Trainer(config, model)
        separate.eval_collector.data_collect(train_data)
        expected = separate.evaluate(test_data, load_best_model=False)
        assert dict(by_size[size]) == dict(expected)


@settings(max_examples=60, deadline=None)
@given(
    n_users=st.integers(1, 6),
    n_items=st.integers(2, 12),
    data=st.data(),
)
def test_shared_positives_equal_recbole_dense_lookup(n_users, n_items, data):
    """Hits and lengths from sorted keys equal RecBole's dense 0/1 matrix, duplicates and empty rows included."""
    n_pos = data.draw(st.integers(0, 3 * n_users))
    positive_u = torch.tensor(
        data.draw(st.lists(st.integers(0, n_users - 1), min_size=n_pos, max_size=n_pos))
    )
    positive_i = torch.tensor(
        data.draw(st.lists(st.integers(0, n_items - 1), min_size=n_pos, max_size=n_pos))
    )
    k = data.draw(st.integers(1, n_items))
    topk_idx = torch.rand(n_users, n_items).topk(k).indices
    dense = torch.zeros(n_users, n_items, dtype=torch.int)
    dense[positive_u.long(), positive_i.long()] = 1
    expected = torch.cat((dense.gather(1, topk_idx), dense.sum(dim=1, keepdim=True)), dim=1)
    positives = _Positives(positive_u.long(), positive_i.long(), (n_users, n_items), torch.device("cpu"))
    got = torch.cat((positives.hits(topk_idx), positives.lengths), dim=1)
    assert torch.equal(got, expected)


def test_sampled_evaluation_run_keeps_its_result_and_skips_the_size_table(
    in_tmp, caplog, monkeypatch, capsys
):
    eval_args = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config = {**FAST, "modalities": [], "use_id_embedding": True, "hidden_size": 16, "mrl_sizes": [8, 16]}
    result = run_recbole_fmrl(
        "fMRLRec", "mm-sample", config_dict={**config, "eval_args": eval_args, "checkpoint_dir": str(in_tmp)}
    )
    assert "ndcg@10" in result["test_result"] and "test_result_by_size" not in result
    assert "valid_result_by_size" not in result
    monkeypatch.setattr(sys, "argv", ["evaluation"])
    assert evaluation_cli([f"--model_file={result['saved_model_file']}"]) == 2
    assert "needs full ranking: set eval_args mode to 'full'" in capsys.readouterr().err


def test_sampled_valid_with_full_test_reports_every_size_on_test_only(in_tmp):
    modes = {"valid": "uni100", "test": "full"}
    eval_args = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": modes}
    config = {**FAST, "modalities": [], "use_id_embedding": True, "hidden_size": 16, "mrl_sizes": [8, 16]}
    result = run_recbole_fmrl(
        "fMRLRec", "mm-sample", config_dict={**config, "eval_args": eval_args, "checkpoint_dir": str(in_tmp)}
    )
    assert list(result["test_result_by_size"]) == [8, 16] and "valid_result_by_size" not in result


def test_checkpoint_from_before_new_keys_loads_with_their_defaults(trained, tmp_path):
    """A pickled checkpoint of an older version lacks keys added since (encoder, item_tower, ...)."""
    result, _ = trained
    checkpoint = torch.load(result["saved_model_file"], weights_only=False)
    for key in (
        "encoder",
        "item_tower",
        "mamba_impl",
        "qarm_codes",
        "mrl_eval_scoring",
        "train_feature_copy",
        "feature_lr_scale",
    ):
        del checkpoint["config"].final_config_dict[key]
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    config, model, *_ = load_data_and_model(str(old), trust=True)
    assert config["encoder"] == "lru" and config["item_tower"] == "features"
    assert config["mrl_eval_scoring"] == "fused" and config["train_feature_copy"] is False
    assert config["feature_lr_scale"] == 1.0
    assert model.encoder.__class__.__name__ == "LRUEncoder"


@pytest.mark.parametrize(
    "tower", [{"freeze_features": False}, {"freeze_features": True, "train_feature_copy": True}]
)
def test_export_with_trained_features_is_a_folded_table_and_scores_alike(in_tmp, monkeypatch, tower):
    """freeze_features: False, or a trained copy beside frozen features: the exported file holds an
    n_items x m table instead of the feature tables (and no digest of the frozen ones), and loads (as an
    ID-embedding model) to the nested model's size-m scores."""
    features = random_text_features(in_tmp, 48)
    n_items = len(Path(features["text"]["ids"]).read_text().split())
    result = run_recbole_fmrl(
        "fMRLRec",
        "mm-sample",
        config_dict={
            **FAST,
            "modalities": ["text"],
            "precomputed_features": features,
            **tower,
            "hidden_size": 32,
            "mrl_sizes": SIZES,
            "checkpoint_dir": str(in_tmp),
        },
    )
    monkeypatch.setattr(sys, "argv", ["export"])
    path = in_tmp / "sub8.pth"
    assert (
        export_cli.main([f"--model_file={result['saved_model_file']}", "--size=8", f"--output={path}"]) == 0
    )
    state = read_portable(path)
    assert state["config"]["modalities"] == [] and state["config"]["use_id_embedding"] is True
    assert not any(key.startswith("item_tower.feature") for key in state["state_dict"])
    assert state["state_dict"]["item_tower.id_embedding.weight"].shape == (n_items + 1, 8)
    _, nested, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    _, sub, *_ = load_data_and_model(str(path))
    nested.eval(), sub.eval()
    with torch.no_grad():
        for batch, *_ in test_data:
            expected = nested.full_sort_predict_sizes(batch)[0]
            torch.testing.assert_close(sub.full_sort_predict(batch), expected, rtol=1e-5, atol=1e-5)


TOPK_METRICS = ["Recall", "MRR", "NDCG", "Hit", "MAP", "Precision", "ItemCoverage", "TailPercentage"]


@pytest.mark.parametrize("block_topk", [False, True], ids=["small-catalogue", "block-topk"])
def test_fused_and_exact_scoring_give_recbole_metrics_at_every_size(trained, block_topk, monkeypatch):
    """The fused, row-chunked scores (8 users a chunk, so history masks cross chunk boundaries) and each
    size's own GEMM both give RecBole's own evaluation of that size, for every top-k metric family."""
    if block_topk:
        monkeypatch.setattr(topk_module, "_MIN_ITEMS", 0)
    result, _ = trained
    config, model, dataset, *_ = load_data_and_model(result["saved_model_file"])
    config["metrics"], config["topk"] = TOPK_METRICS, [3, 10]
    config["eval_batch_size"] = 20 * dataset.item_num  # at least 20 users a batch: 3 chunks or more
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    assert len(next(iter(test_data))[0]) >= 20
    monkeypatch.setattr(evaluate_module, "CHUNK_BYTES", 4 * test_data._dataset.item_num * 8)
    by_scoring = {}
    for scoring in ("fused", "exact"):
        config["mrl_eval_scoring"] = scoring
        trainer = Trainer(config, model)
        trainer.eval_collector.data_collect(train_data)
        by_scoring[scoring] = evaluate_all_sizes(trainer, test_data)
    for size in SIZES:
        model.eval_size = size
        separate = Trainer(config, model)
        separate.eval_collector.data_collect(train_data)
        expected = dict(separate.evaluate(test_data, load_best_model=False))
        assert dict(by_scoring["fused"][size]) == expected
        assert dict(by_scoring["exact"][size]) == expected


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(1, 9),
    n_items=st.integers(2, 15),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    chunk_rows=st.integers(1, 10),
    data=st.data(),
)
def test_fused_size_scores_equal_each_sizes_masked_gemm(n_rows, n_items, sizes, chunk_rows, data):
    """Every chunk of every size equals ``q[:, :m] @ E[:, :m].T`` with the padding item and the history set
    to -inf, up to float rounding, whatever the chunking and the order of the history pairs."""
    sizes = list(itertools.accumulate(sizes))
    query, items = torch.randn(n_rows, sizes[-1]), torch.randn(n_items, sizes[-1])
    n_hist = data.draw(st.integers(0, 2 * n_rows))
    rows = torch.tensor(data.draw(st.lists(st.integers(0, n_rows - 1), min_size=n_hist, max_size=n_hist)))
    cols = torch.tensor(data.draw(st.lists(st.integers(0, n_items - 1), min_size=n_hist, max_size=n_hist)))
    history = (rows.long(), cols.long()) if n_hist else None
    seen = set()
    for k, r0, scores in fused_size_scores(query, items, sizes, history, chunk_rows):
        m = sizes[k]
        expected = query[:, :m] @ items[:, :m].T
        expected[:, 0] = float("-inf")
        if history is not None:
            expected[history] = float("-inf")
        expected = expected[r0 : r0 + scores.size(0)]
        assert torch.equal(torch.isinf(scores), torch.isinf(expected))
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
        seen.add((k, r0))
    assert seen == {(k, r0) for k in range(len(sizes)) for r0 in range(0, n_rows, min(chunk_rows, n_rows))}


def test_bad_eval_scoring_is_one_config_error(in_tmp):
    with pytest.raises(ConfigError, match="mrl_eval_scoring='fast' is not one of fused, exact"):
        run_recbole_fmrl("fMRLRec", "mm-sample", config_dict={**FAST, "mrl_eval_scoring": "fast"})


def test_metrics_that_need_every_score_take_the_exact_path(trained, monkeypatch):
    """GAUC needs rec.meanrank (every score), so the fused chunks are never used for it."""
    result, _ = trained
    config, model, _, train_data, _, test_data = load_data_and_model(result["saved_model_file"])
    config["metrics"], config["mrl_eval_scoring"] = ["GAUC", "NDCG"], "fused"

    def refuse(*args, **kwargs):
        raise AssertionError("fused scores used for a metric that needs every score")

    monkeypatch.setattr(evaluate_module, "fused_size_scores", refuse)
    trainer = Trainer(config, model)
    trainer.eval_collector.data_collect(train_data)
    assert "gauc" in evaluate_all_sizes(trainer, test_data)[SIZES[0]]
