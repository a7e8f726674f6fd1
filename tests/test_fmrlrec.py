"""fMRLRec: nesting exactness of the whole model, one-pass all-size scoring, training modes, bad input."""

import numpy as np
import pytest
import torch
from conftest import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_fmrl.config import Config
from recbole_fmrl.data.features import FeatureError
from recbole_fmrl.data.training_windows import last_windows
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.layers.item_tower import ItemTower
from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError
from recbole_fmrl.model.sequential_recommender.fmrlrec import fMRLRec
from recbole_fmrl.quick_start import run_recbole_fmrl
from recbole_fmrl.submodel.export import export_submodel, parameter_counts

ID_ONLY = {
    "modalities": [],
    "use_id_embedding": True,
    "state": "WARNING",
    "dropout_prob": 0.3,
    "attn_dropout_prob": 0.3,
}


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    config = Config("fMRLRec", "mm-sample", config_dict={**ID_ONLY, "hidden_size": 16, "mrl_sizes": [4, 16]})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, dataset, train, test


def build(mm, sizes, seed, **extra):
    config, dataset, train, _ = mm
    for key, value in {**ID_ONLY, "hidden_size": sizes[-1], "mrl_sizes": sizes, **extra}.items():
        config[key] = value
    init_seed(seed, True)
    return fMRLRec(config, train._dataset).eval()


def first_batch(loader):
    return next(iter(loader))[0]


def random_text_features(dataset, folder, seed: int) -> dict:
    """precomputed_features of 12 random text feature columns for the dataset's items, saved in folder."""
    tokens = list(dataset.field2id_token["item_id"][1:])
    matrix = np.random.default_rng(seed).normal(size=(len(tokens), 12)).astype(np.float32)
    np.save(folder / "f.npy", matrix)
    (folder / "ids.txt").write_text("\n".join(tokens))
    return {"text": {"path": str(folder / "f.npy"), "ids": str(folder / "ids.txt")}}


def assert_exports_are_folded_tables(model, batch, sizes) -> None:
    """Each size's export scores as the nested model at that size, from one n_items x m table (the trained
    features and their projection folded), and keeps no feature table."""
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate(sizes):
            sub = export_submodel(model, m)
            torch.testing.assert_close(sub.full_sort_predict(batch), all_sizes[k], rtol=1e-4, atol=1e-4)
            assert parameter_counts(sub)["item_tower"] == model.n_items * m
            assert not any(key.startswith("item_tower.feature") for key in sub.state_dict())


nestings = st.lists(st.integers(1, 20), min_size=1, max_size=4, unique=True).map(sorted)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=nestings, seed=st.integers(0, 1000), n_layers=st.integers(1, 2))
def test_exported_submodel_reproduces_nested_scores(mm, sizes, seed, n_layers):
    """Invariant 1: the size-m_k scores equal those of the model with every weight sliced to m_k."""
    model = build(mm, sizes, seed, n_layers=n_layers)
    batch = first_batch(mm[3])  # right-padded test sequences of varying length
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate(sizes):
            sub = export_submodel(model, m)
            assert sub.hidden_size == m and sub.mrl_sizes == sizes[: k + 1]
            torch.testing.assert_close(sub.full_sort_predict(batch), all_sizes[k], rtol=1e-4, atol=1e-4)


def test_one_pass_all_sizes_equals_per_size_prediction(mm):
    model = build(mm, [4, 8, 16], seed=3)
    batch = first_batch(mm[3])
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate([4, 8, 16]):
            model.eval_size = m
            assert torch.equal(model.full_sort_predict(batch), all_sizes[k])  # bit for bit: no near-tie swaps
            items = batch[model.ITEM_ID]
            torch.testing.assert_close(
                model.predict(batch), all_sizes[k][torch.arange(len(items)), items], rtol=1e-4, atol=1e-4
            )


def test_export_is_smaller(mm):
    model = build(mm, [4, 8, 16], seed=0)
    full, small = parameter_counts(model), parameter_counts(export_submodel(model, 4))
    assert small["encoder"] < full["encoder"] / 4 and small["item_tower"] < full["item_tower"]


def test_all_position_windows_cover_every_target_once(mm):
    config, _, train, _ = mm
    windows = last_windows(train)
    prefix = train._dataset.inter_feat
    kept = windows._dataset.inter_feat
    # Each kept window of length l trains l targets; together: every augmented target exactly once.
    assert int(kept["item_length"].sum()) == len(prefix)
    assert len(set(kept["user_id"].tolist())) == len(set(prefix["user_id"].tolist()))


def test_all_positions_loss_equals_mean_of_prefix_losses(mm):
    """One pass over a window gives the same per-target CE as the separate prefix samples it replaces."""
    model = build(mm, [8, 16], seed=1, dropout_prob=0.0, attn_dropout_prob=0.0)
    _, _, train, _ = mm
    windows = last_windows(train)
    batch = windows._dataset.inter_feat[torch.arange(1)]
    n = int(batch["item_length"][0])
    model.train_mode = "all_positions"
    window_loss = model.calculate_loss(batch)
    seq = batch["item_id_list"][0]
    targets = torch.cat([seq[1:n], batch["item_id"]])
    prefixes = batch.repeat(n)
    lists = torch.zeros_like(prefixes["item_id_list"])
    for t in range(n):
        lists[t, : t + 1] = seq[: t + 1]
    prefixes.update(
        type(batch)({"item_id_list": lists, "item_length": torch.arange(1, n + 1), "item_id": targets})
    )
    model.train_mode = "prefix"
    torch.testing.assert_close(window_loss, model.calculate_loss(prefixes), rtol=1e-4, atol=1e-5)


def test_training_beats_popularity_on_mm_sample(in_tmp):
    common = {**FAST, "epochs": 12, "checkpoint_dir": str(in_tmp), "seed": 7}
    pop = run_recbole_fmrl("Pop", "mm-sample", config_dict=common)
    ours = run_recbole_fmrl(
        "fMRLRec",
        "mm-sample",
        config_dict={
            **common,
            "modalities": ["text"],
            "hidden_size": 64,
            "mrl_sizes": [8, 16, 32, 64],
            "learning_rate": 0.003,
            "train_batch_size": 32,
            "dropout_prob": 0.2,
            "attn_dropout_prob": 0.2,
        },
    )
    assert ours["test_result"]["ndcg@10"] > pop["test_result"]["ndcg@10"] + 0.05


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"eval_size": 5}, MatryoshkaSizeError, "eval_size=5 is not one of"),
        ({"mrl_sizes": [8, 4, 16]}, MatryoshkaSizeError, "strictly increasing"),
        ({"mrl_sizes": [4, 8]}, MatryoshkaSizeError, "must equal hidden_size \\(16\\)"),
        ({"mrl_loss_weights": [1.0]}, MatryoshkaSizeError, "one non-negative weight per size"),
        ({"train_mode": "sometimes"}, ValueError, "train_mode"),
        ({"modalities": ["audio"]}, ConfigError, "\\['audio'\\] have no features"),
        ({"feature_norm": "zscore"}, ConfigError, "feature_norm='zscore' is not valid"),
        ({"feature_norm": "standardize", "item_tower": "qarm"}, ConfigError, "item_tower: features only"),
        ({"train_feature_copy": True}, ConfigError, "train_feature_copy=True .* needs .* a modality"),
        ({"feature_lr_scale": 0}, ConfigError, "feature_lr_scale=0 must be a number > 0 .* freeze_features"),
        ({"feature_lr_scale": "slow"}, ConfigError, "feature_lr_scale='slow' must be a number > 0"),
        (
            {"feature_lr_scale": 0.5, "learner": "sgd"},
            ConfigError,
            "feature_lr_scale=0.5 needs learner adam or adamw .* or set feature_lr_scale=1.0",
        ),
        (
            {"train_feature_copy": True, "modalities": ["text"], "freeze_features": False},
            ConfigError,
            "freeze_features=True \\(with freeze_features=False the features are trained already\\)",
        ),
    ],
)
def test_bad_config_is_rejected(mm, extra, error, match):
    config, _, train, _ = mm
    base = {
        **ID_ONLY,
        "hidden_size": 16,
        "mrl_sizes": [4, 8, 16],
        "eval_size": None,
        "mrl_loss_weights": None,
        "train_mode": "all_positions",
        "feature_norm": "none",
        "item_tower": "features",
        "train_feature_copy": False,
        "freeze_features": True,
        "feature_lr_scale": 1.0,
        "learner": "adamw",
    }
    saved = {key: config[key] for key in {**base, **extra}}
    for key, value in {**base, **extra}.items():
        config[key] = value
    try:
        with pytest.raises(error, match=match):
            fMRLRec(config, train._dataset)
    finally:  # the config is the module's: later tests build from it
        for key, value in saved.items():
            config[key] = value


@pytest.mark.parametrize("problem", ["rows", "nan"])
def test_bad_precomputed_features_are_rejected(mm, tmp_path, problem):
    config, dataset, train, _ = mm
    tokens = list(dataset.field2id_token["item_id"][1:])
    matrix = np.random.default_rng(0).normal(size=(len(tokens), 8)).astype(np.float32)
    if problem == "rows":
        matrix = matrix[:-3]
    else:
        matrix[5, 2] = np.nan
    np.save(tmp_path / "f.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(tokens))
    for key, value in {
        **ID_ONLY,
        "hidden_size": 16,
        "mrl_sizes": [4, 16],
        "modalities": ["text"],
        "precomputed_features": {"text": {"path": str(tmp_path / "f.npy"), "ids": str(tmp_path / "ids.txt")}},
    }.items():
        config[key] = value
    with pytest.raises(FeatureError, match="item ids" if problem == "rows" else "NaN/Inf"):
        fMRLRec(config, train._dataset)
    config["precomputed_features"] = None


def test_standardizing_a_single_item_or_a_constant_column_gives_zeros_not_nan():
    from recbole_fmrl.model.layers.item_tower import normalize_features

    one_item = torch.tensor([[0.0, 0.0], [2.0, 5.0]])  # padding row + one item
    constant = torch.tensor([[0.0, 0.0], [1.0, 3.0], [1.0, 4.0]])
    assert torch.equal(normalize_features({"t": one_item}, "standardize")["t"], torch.zeros(2, 2))
    assert torch.equal(normalize_features({"t": constant}, "standardize")["t"][:, 0], torch.zeros(3))
    with pytest.raises(ValueError, match="feature_norm='l2' is not one of"):
        normalize_features({"t": constant}, "l2")


@pytest.mark.parametrize("norm", ["none", "standardize"])
def test_feature_norm_standardizes_each_feature_column(mm, tmp_path, norm):
    config, dataset, _, _ = mm
    tokens = list(dataset.field2id_token["item_id"][1:])
    rng = np.random.default_rng(0)
    matrix = (3.0 + 5.0 * rng.normal(size=(len(tokens), 6))).astype(np.float32)
    np.save(tmp_path / "f.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(tokens))
    features = {"text": {"path": str(tmp_path / "f.npy"), "ids": str(tmp_path / "ids.txt")}}
    try:
        model = build(
            mm,
            [4, 16],
            0,
            modalities=["text"],
            precomputed_features=features,
            feature_norm=norm,
            item_tower="features",
        )
    finally:
        config["precomputed_features"], config["modalities"], config["feature_norm"] = None, [], "none"
    table = model.item_tower.features
    assert bool((table[0] == 0).all())  # the padding item
    if norm == "none":
        torch.testing.assert_close(table[1:], torch.from_numpy(matrix))
    else:
        torch.testing.assert_close(table[1:].mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(table[1:].std(0), torch.ones(6), atol=1e-5, rtol=0)


def test_trainable_features_are_learned_saved_and_exported(mm, tmp_path):
    """freeze_features: False (the official code's --freeze_embed False): the feature table is a parameter,
    a step changes it, the state dict carries it, and every size's export scores with the trained table,
    folded into an n_items x m table."""
    config, dataset, train, test = mm
    features = random_text_features(dataset, tmp_path, seed=0)
    saved = config["freeze_features"]
    try:
        frozen = build(
            mm, [4, 16], 0, modalities=["text"], precomputed_features=features, freeze_features=True
        )
        assert "item_tower.features" not in dict(frozen.named_parameters())
        model = build(
            mm, [4, 16], 0, modalities=["text"], precomputed_features=features, freeze_features=False
        ).train()
    finally:
        config["precomputed_features"], config["freeze_features"], config["modalities"] = None, saved, []
    table = dict(model.named_parameters())["item_tower.features"]
    before = table.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.calculate_loss(next(iter(train))).backward()
    optimizer.step()
    assert not torch.equal(table.detach(), before)
    assert torch.equal(model.state_dict()["item_tower.features"], table.detach())
    assert_exports_are_folded_tables(model.eval(), first_batch(test), [4, 16])
    with torch.no_grad():
        assert model.submodel_config(4) | {"mrl_sizes": None} == {
            "hidden_size": 4,
            "mrl_sizes": None,
            "eval_size": 4,
            "modalities": [],
            "use_id_embedding": True,
            "train_feature_copy": False,
        }


@pytest.mark.parametrize("features, freeze", [({}, True), ({"text": torch.ones(5, 3)}, False)])
def test_feature_copy_needs_frozen_features(features, freeze):
    with pytest.raises(ValueError, match="needs modalities and freeze_features: True"):
        ItemTower(5, 4, features, use_id_embedding=True, freeze_features=freeze, train_feature_copy=True)


def test_trained_feature_copy_learns_beside_fixed_features_and_exports_folded(mm, tmp_path):
    """train_feature_copy: the frozen features stay fixed and out of the state dict, the copy starts equal
    to them and is learned and saved, the item embedding is the sum of both projections, and every size's
    export scores alike from one folded n_items x m table."""
    config, dataset, train, test = mm
    features = random_text_features(dataset, tmp_path, seed=1)
    extra = {"modalities": ["text"], "precomputed_features": features, "use_id_embedding": False}
    try:
        model = build(mm, [4, 16], 0, **extra, train_feature_copy=True).train()
    finally:
        config["precomputed_features"], config["modalities"], config["train_feature_copy"] = None, [], False
    tower = model.item_tower
    params = dict(model.named_parameters())
    assert "item_tower.features" not in params and "item_tower.features" not in model.state_dict()
    assert torch.equal(params["item_tower.feature_copy"].detach(), tower.features)
    with torch.no_grad():
        expected = tower.projection(tower.features) + tower.features @ tower.copy_projection.weight.T
        torch.testing.assert_close(tower(), expected)
    fixed, copy = tower.features.clone(), tower.feature_copy.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.calculate_loss(next(iter(train))).backward()
    optimizer.step()
    assert torch.equal(tower.features, fixed)
    assert not torch.equal(tower.feature_copy.detach(), copy)
    assert torch.equal(model.state_dict()["item_tower.feature_copy"], tower.feature_copy.detach())
    assert_exports_are_folded_tables(model.eval(), first_batch(test), [4, 16])
    assert model.submodel_config(4)["modalities"] == [] and model.submodel_config(4)["use_id_embedding"]
