"""QARM: RQ-Kmeans and VQ codes, behaviour alignment (no leaks), the nested code tower, export, bad input."""

import numpy as np
import pytest
import torch
from conftest import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_fmrl.config import Config
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.sequential_recommender.qarmrec import QARMRec
from recbole_fmrl.quantization.alignment import (
    item_cf_neighbours,
    neighbour_agreement,
    train_alignment,
    u2i_pairs,
    user_item_matrix,
)
from recbole_fmrl.quantization.codes import code_stats, rq_kmeans, vq_codes
from recbole_fmrl.quantization.qarm import export_codes_atomic, item_codes
from recbole_fmrl.submodel.export import export_submodel

SMALL = {
    "state": "WARNING",
    "modalities": ["text"],
    "hidden_size": 16,
    "mrl_sizes": [4, 8, 16],
    "qarm_rq_levels": 3,
    "qarm_rq_codebook": 8,
    "qarm_vq_k": 5,
    "qarm_align_epochs": 3,
    "qarm_codes": ["rq", "vq"],
    "qarm_use_feature": True,
    "item_tower": "qarm",
}


@pytest.fixture(scope="module")
def mm():
    config = Config("QARMRec", "mm-sample", config_dict=dict(SMALL))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, dataset, train, test


def test_rq_kmeans_error_falls_with_every_level_and_is_seeded():
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    result = rq_kmeans(x, levels=4, codebook_size=16, seed=1)
    assert result.codes.shape == (300, 4) and result.codes.min() >= 0 and result.codes.max() < 16
    start = float((x**2).sum(1).mean())
    errors = [start, *result.errors]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    # the codes reconstruct x as the sum of their level centroids, to the reported error
    recon = sum(c[result.codes[:, level]] for level, c in enumerate(result.centroids))
    assert np.isclose(((x - recon) ** 2).sum(1).mean(), result.errors[-1], rtol=1e-4)
    assert np.array_equal(rq_kmeans(x, 4, 16, seed=1).codes, result.codes)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 60),
    dim=st.integers(1, 8),
    k=st.integers(1, 6),
    chunk=st.integers(1, 70),
    exclude=st.booleans(),
    seed=st.integers(0, 99),
)
def test_vq_codes_equal_brute_force_top_k(n, dim, k, chunk, exclude, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    if k > n - exclude:
        with pytest.raises(ConfigError, match="qarm_vq_k"):
            vq_codes(x, k, exclude_self=exclude, chunk_size=chunk)
        return
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    if exclude:
        np.fill_diagonal(sims, -np.inf)
    got = vq_codes(x, k, exclude_self=exclude, chunk_size=chunk)
    # ties aside (random data), the same items in the same order; compare the similarities to be tie-proof
    expected = np.sort(sims, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(np.take_along_axis(sims, got, 1), expected, rtol=1e-5, atol=1e-6)
    if exclude:
        assert not (got == np.arange(n)[:, None]).any()


def test_vq_codes_over_a_separate_pool():
    rng = np.random.default_rng(1)
    x, pool = rng.normal(size=(7, 4)), rng.normal(size=(30, 4))
    got = vq_codes(x, 3, pool=pool, chunk_size=2)
    sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        pool / np.linalg.norm(pool, axis=1, keepdims=True)
    ).T
    assert np.array_equal(got, np.argsort(-sims, axis=1)[:, :3])


def test_code_stats_counts_collisions_and_usage():
    codes = np.array([[0, 1], [0, 1], [1, 0], [2, 2]])
    stats = code_stats(codes, codebook_size=4)
    assert stats["collision_rate"] == 0.5 and stats["distinct_codes"] == 3
    assert stats["codebook_usage"] == [0.75, 0.75]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: rq_kmeans(x, 0, 4), "qarm_rq_levels=0"),
        (lambda x: rq_kmeans(x, 2, 11), "qarm_rq_codebook=11 is larger than the 10 items"),
        (lambda x: vq_codes(x, 10), "qarm_vq_k=10 needs at least 11 items"),
        (lambda x: vq_codes(x, 0), "qarm_vq_k=0"),
    ],
)
def test_bad_code_settings_are_one_clear_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call(np.random.default_rng(0).normal(size=(10, 3)))


def test_alignment_loss_falls_and_neighbours_follow_behaviour(mm):
    config, _, train, _ = mm
    from recbole_fmrl.data.features import load_item_features

    features = load_item_features(config, train._dataset, ["text"])["text"].numpy()
    matrix = user_item_matrix(train._dataset)
    pairs = np.concatenate([u2i_pairs(train._dataset, features), item_cf_neighbours(matrix, 3)])
    aligned, losses = train_alignment(features, pairs, epochs=8, batch_size=256)
    assert losses[-1] < 0.9 * losses[0], losses
    assert neighbour_agreement(aligned, matrix) > neighbour_agreement(features, matrix)
    assert np.allclose(np.linalg.norm(aligned[1:], axis=1), 1.0, atol=1e-5) and not aligned[0].any()


def _leaky_dataset(root, n_users=40, n_items=30):
    """Every user's last two interactions (valid and test) are items nobody has in training."""
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\ttimestamp:float\n"]
    for u in range(n_users):
        items = rng.choice(n_items, size=6, replace=False)
        seq = [f"i{i}" for i in items] + [f"valid{u}", f"test{u}"]
        lines += [f"u{u}\t{item}\t{t}\n" for t, item in enumerate(seq)]
    folder = root / "leaky"
    folder.mkdir()
    (folder / "leaky.inter").write_text("".join(lines))
    return str(root)


def test_no_valid_or_test_interaction_reaches_the_pairs(tmp_path):
    config = Config(
        "QARMRec",
        "leaky",
        config_dict={
            **SMALL,
            "data_path": _leaky_dataset(tmp_path),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "MAX_ITEM_LIST_LENGTH": 10,
        },
    )
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    tokens = dataset.field2id_token["item_id"]
    held_out = {i for i, tok in enumerate(tokens) if tok.startswith(("valid", "test"))}
    assert len(held_out) == 80
    features = np.random.default_rng(0).normal(size=(len(tokens), 6)).astype(np.float32)
    matrix = user_item_matrix(train._dataset)
    u2i, i2i = u2i_pairs(train._dataset, features), item_cf_neighbours(matrix, 3)
    assert len(u2i) > 100 and len(i2i) > 20  # the check below is not vacuous
    seen = set(u2i.ravel()) | set(i2i.ravel()) | set(matrix.nonzero()[1])
    assert not seen & held_out


def build(mm, seed=0, **extra):
    config, _, train, _ = mm
    for key, value in {**SMALL, **extra}.items():
        config[key] = value
    init_seed(seed, True)
    return QARMRec(config, train._dataset).eval()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    codes=st.sampled_from([["rq"], ["vq"], ["rq", "vq"]]),
    use_feature=st.booleans(),
    seed=st.integers(0, 100),
)
def test_qarm_export_reproduces_nested_scores(mm, codes, use_feature, seed):
    model = build(mm, seed, qarm_codes=codes, qarm_use_feature=use_feature)
    with torch.no_grad():  # trained-like code embeddings, not the small init
        for p in model.item_tower.parameters():
            p.normal_()
    batch = next(iter(mm[3]))[0]
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate(model.mrl_sizes):
            sub = export_submodel(model, m)
            torch.testing.assert_close(sub.full_sort_predict(batch), all_sizes[k], rtol=1e-4, atol=1e-4)
            if "rq" in codes:
                assert torch.equal(sub.item_tower.rq_index, model.item_tower.rq_index)


def test_qarm_trains_and_its_export_file_reproduces_every_size(mm, in_tmp):
    from recbole_fmrl.cli import export as export_cli
    from recbole_fmrl.quick_start import load_data_and_model, run_recbole_fmrl

    result = run_recbole_fmrl("QARMRec", "mm-sample", config_dict={**FAST, **SMALL, "epochs": 2}, cli_args=[])
    assert set(result["test_result_by_size"]) == {4, 8, 16}
    _, nested, _, _, _, test = load_data_and_model(result["saved_model_file"], trust=True)
    assert nested.item_tower.rq_index.shape[1] == 3 and nested.item_tower.vq_index.shape[1] == 5
    batch = next(iter(test))[0]
    nested.eval()
    for k, size in enumerate([4, 8, 16]):
        path = in_tmp / f"qarm{size}.pth"
        argv = [f"--model_file={result['saved_model_file']}", f"--size={size}", f"--output={path}", "--trust"]
        assert export_cli.main(argv) == 0
        _, sub, *_ = load_data_and_model(str(path))
        with torch.no_grad():
            expected = nested.full_sort_predict_sizes(batch)[k]
            torch.testing.assert_close(sub.eval().full_sort_predict(batch), expected, rtol=1e-5, atol=1e-5)


def test_codes_export_as_atomic_token_seq_fields(mm, tmp_path):
    config, dataset, train, _ = mm
    for key, value in SMALL.items():
        config[key] = value
    codes = item_codes(config, train._dataset)
    assert 0 <= codes.report["rq"]["collision_rate"] <= 1 and codes.report["u2i_pairs"] > 0
    out = export_codes_atomic(config, dataset, codes, tmp_path)
    reread = Config(
        "SASRecF",
        "mm-sample",
        config_dict={
            "data_path": str(out.parent),
            "state": "WARNING",
            "load_col": {
                "inter": ["user_id", "item_id", "timestamp"],
                "item": ["item_id", "qarm_rq", "qarm_vq"],
            },
            "selected_features": ["qarm_rq"],
        },
    )
    ds = create_dataset(reread)
    assert ds.field2type["qarm_rq"].value == "token_seq"
    tokens = ds.field2id_token["item_id"]
    some = next(i for i, t in enumerate(tokens) if t != "[PAD]")
    rq = [ds.field2id_token["qarm_rq"][c] for c in ds.item_feat["qarm_rq"][some] if c]
    original = list(dataset.field2id_token["item_id"]).index(tokens[some])
    assert rq == [f"l{lvl}_{c}" for lvl, c in enumerate(codes.rq[original])]


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"qarm_rq_levels": 0}, "qarm_rq_levels=0"),
        ({"qarm_rq_codebook": 500}, "qarm_rq_codebook=500 is larger than the 200 items"),
        ({"qarm_vq_k": 200}, "qarm_vq_k=200 needs at least 201 items"),
        ({"qarm_codes": ["pq"]}, "qarm_codes"),
        ({"item_tower": "foo"}, "QARMRec needs item_tower: qarm"),
        ({"modalities": []}, "modalities is empty"),
    ],
)
def test_bad_qarm_config_is_one_clear_error(mm, extra, match):
    with pytest.raises(ConfigError, match=match):
        build(mm, **extra)


def test_cli_writes_codes_that_recbole_sasrecf_trains_on(in_tmp, capsys):
    from recbole_fmrl.cli.qarm import main
    from recbole_fmrl.quick_start import run_recbole_fmrl

    settings = [f"--{k}={v}" for k, v in SMALL.items() if k != "state"]
    assert main(["--dataset=mm-sample", f"--out={in_tmp / 'coded'}", *settings]) == 0
    assert "collision rate" in capsys.readouterr().out
    assert (in_tmp / "coded" / "mm-sample" / "qarm-report.json").is_file()
    result = run_recbole_fmrl(
        "SASRecF",
        "mm-sample",
        config_dict={
            **FAST,
            "data_path": str(in_tmp / "coded"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "qarm_rq"]},
            "selected_features": ["qarm_rq"],
        },
        cli_args=[],
    )
    assert result["test_result"]["ndcg@10"] >= 0


def test_cli_refuses_to_overwrite_the_dataset(capsys):
    from recbole_fmrl.cli.qarm import main
    from recbole_fmrl.paths import dataset_dirs

    folder = next(d for d in dataset_dirs() if (d / "mm-sample").is_dir())
    before = (folder / "mm-sample" / "mm-sample.item").read_bytes()
    assert main(["--dataset=mm-sample", f"--out={folder}"]) == 2
    assert "would replace its .item file" in capsys.readouterr().err
    assert (folder / "mm-sample" / "mm-sample.item").read_bytes() == before
    assert not (folder / "mm-sample" / "qarm-report.json").exists()
