"""Mechanisms that follow the papers' official code: initialisation, optimiser, schedule, negatives, stats."""

import copy
import math
from collections import Counter

import pytest
import torch
from conftest import FAST, random_text_features
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from torch.nn import functional as F

from recbole_fmrl.config import Config
from recbole_fmrl.model.general_recommender.mrl4rec import MRL4Rec
from recbole_fmrl.model.layers.lru import LRULayer
from recbole_fmrl.model.sequential_recommender.fmrlrec import fMRLRec
from recbole_fmrl.trainer import fMRLRecTrainer, fused_optimizer_supported, warmup_cosine

ID_ONLY = {**FAST, "modalities": [], "use_id_embedding": True, "hidden_size": 64, "mrl_sizes": [16, 64]}


@pytest.fixture(scope="module")
def mm():
    config = Config("fMRLRec", "mm-sample", config_dict=ID_ONLY)
    dataset = create_dataset(config)
    return config, dataset, *data_preparation(config, dataset)


def test_id_embeddings_start_small_so_the_first_loss_is_about_log_n(mm):
    config, dataset, train, *_ = mm
    init_seed(0, True)
    model = fMRLRec(config, train._dataset)
    weight = model.item_tower.id_embedding.weight
    assert torch.equal(weight[0], torch.zeros_like(weight[0]))
    assert 0.015 < weight[1:].std().item() < 0.025
    loss = model.calculate_loss(next(iter(train)).to(config["device"])).item()
    assert abs(loss - math.log(dataset.item_num)) < 0.5, (loss, math.log(dataset.item_num))


def test_lru_projections_start_real():
    layer = LRULayer([4, 8])
    assert not layer.in_im.weight.any() and not layer.in_im.bias.any() and not layer.out_im.weight.any()
    assert layer.in_re.weight.any() and layer.out_re.weight.any()


def test_warmup_cosine_schedule_values():
    f = warmup_cosine(100, 1100)
    assert f(0) == 0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(1.0)
    assert f(600) == pytest.approx(0.5) and f(1100) == pytest.approx(0.0) and f(5000) == pytest.approx(0.0)


def test_trainer_warms_up_and_spares_biases_and_norms_from_decay(mm, in_tmp):
    config, _, train, valid, _ = mm
    config["warmup_steps"], config["epochs"] = 4, 1
    init_seed(0, True)
    model = fMRLRec(config, train._dataset)
    trainer = fMRLRecTrainer(config, model)
    decay, no_decay = trainer.optimizer.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == config["weight_decay"]
    assert trainer.optimizer.defaults["eps"] == pytest.approx(1e-9)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    trainer._attach_schedule(steps_per_epoch=10)
    lrs = []
    for _ in range(6):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
    peak = config["learning_rate"]
    assert lrs[:5] == pytest.approx([0, peak / 4, peak / 2, 3 * peak / 4, peak])
    assert lrs[5] < peak


@pytest.mark.parametrize(
    "tower", [{"freeze_features": False}, {"freeze_features": True, "train_feature_copy": True}]
)
def test_trained_feature_tables_learn_at_feature_lr_scale_through_the_schedule(in_tmp, tower):
    features = random_text_features(in_tmp, 24)
    config = Config(
        "fMRLRec",
        "mm-sample",
        config_dict={
            **FAST,
            "modalities": ["text"],
            "precomputed_features": features,
            "use_id_embedding": False,
            **tower,
            "hidden_size": 16,
            "mrl_sizes": [8, 16],
            "feature_lr_scale": 0.25,
            "warmup_steps": 4,
            "weight_decay": 0.0,
        },
    )
    dataset = create_dataset(config)
    train = data_preparation(config, dataset)[0]
    init_seed(0, True)
    model = fMRLRec(config, train._dataset)
    trainer = fMRLRecTrainer(config, model)
    tables = model.trained_feature_tables()
    table = model.item_tower.features if tower["freeze_features"] is False else model.item_tower.feature_copy
    assert [id(t) for t in tables] == [id(table)]
    *others, feature_group = trainer.optimizer.param_groups
    assert [id(p) for p in feature_group["params"]] == [id(table)]
    assert all(id(p) != id(table) for group in others for p in group["params"])
    peak = config["learning_rate"]
    assert feature_group["lr"] == pytest.approx(peak / 4) and others[0]["lr"] == pytest.approx(peak)
    batch = next(iter(train)).to(config["device"])
    # Adam's first step moves every weight with a gradient by its learning rate (eps is 1e-9): the feature
    # table by a quarter of what the projection moves.
    weight = (
        model.item_tower.projection if tower["freeze_features"] is False else model.item_tower.copy_projection
    )
    before = table.detach().clone(), weight.weight.detach().clone()
    model.calculate_loss(batch).backward()
    trainer.optimizer.step()
    assert (table.detach() - before[0]).abs().max().item() == pytest.approx(peak / 4, rel=1e-3)
    assert (weight.weight.detach() - before[1]).abs().max().item() == pytest.approx(peak, rel=1e-3)
    trainer._attach_schedule(steps_per_epoch=10)
    for step in range(1, 4):  # the warm-up scales both rates alike
        trainer.optimizer.step()
        assert feature_group["lr"] == pytest.approx(others[0]["lr"] / 4) == pytest.approx(peak * step / 16)


def test_resumed_training_continues_the_schedule(mm, in_tmp):
    config, _, train, *_ = mm
    config["warmup_steps"], config["epochs"] = 4, 3
    init_seed(0, True)
    trainer = fMRLRecTrainer(config, fMRLRec(config, train._dataset))
    trainer.start_epoch = 1  # as RecBole's resume_checkpoint leaves it after one finished epoch
    trainer._attach_schedule(steps_per_epoch=10)
    peak = config["learning_rate"]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * warmup_cosine(4, 30)(10))
    trainer.optimizer.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * warmup_cosine(4, 30)(11))


def test_trainer_uses_the_fused_optimizer_step_equal_to_the_plain_one(mm, in_tmp):
    config, _, train, *_ = mm
    init_seed(0, True)
    model = fMRLRec(config, train._dataset)
    trainer = fMRLRecTrainer(config, model)
    assert trainer.optimizer.defaults["fused"] is True
    plain_model = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in trainer.optimizer.param_groups:
        params = [plain_model.get_parameter(names[id(p)]) for p in group["params"]]
        groups.append({**group, "params": params, "fused": False})
    plain = type(trainer.optimizer)(groups)
    batch = next(iter(train)).to(config["device"])
    for m, opt in ((model, trainer.optimizer), (plain_model, plain)):
        torch.manual_seed(1)  # the same dropout masks
        for _ in range(2):
            opt.zero_grad()
            m.calculate_loss(batch).backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not fused_optimizer_supported([torch.zeros(2, dtype=torch.complex64)])


def test_training_statistics_come_from_all_training_data(mm, in_tmp):
    config, _, train, valid, _ = mm
    config["metrics"] = ["NDCG", "AveragePopularity"]
    config["epochs"] = 1
    init_seed(0, True)
    trainer = fMRLRecTrainer(config, fMRLRec(config, train._dataset))
    trainer.fit(train, valid, saved=False)
    counted = trainer.eval_collector.data_struct.get("data.count_items")
    items = train._dataset.inter_feat[train._dataset.iid_field].tolist()
    assert counted == Counter(items)
    assert "data_collect" not in vars(trainer.eval_collector)


@pytest.fixture(scope="module")
def ml100k():
    config = Config("MRL4Rec", "ml-100k", config_dict={"state": "WARNING"})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    return config, train


def _model(ml100k, mode):
    config, train = ml100k
    config["mrl_neg_sampling"], config["n_negs"] = mode, 8
    init_seed(0, True)
    return MRL4Rec(config, train._dataset)


def test_dns_shares_one_full_size_hard_negative_across_levels(ml100k):
    model = _model(ml100k, "dns")
    assert model.mrl_sizes == [4, 8, 16, 32, 64]  # the nesting is kept: Matryoshka BPR at every level
    users = torch.arange(1, 33)
    user_all, item_all = model.forward()
    negs = model.shared_negatives(user_all[users], item_all, users)
    assert negs.shape == (32, 5) and (negs == negs[:, :1]).all()
    assert not model.is_training_positive(users, negs[:, 0]).any()


def test_rns_draws_an_independent_negative_per_level(ml100k):
    model = _model(ml100k, "rns")
    batch = next(iter(ml100k[1]))
    seen = []
    original = model.sample_candidates
    model.sample_candidates = lambda users, n: seen.append(n) or original(users, n)
    model.calculate_loss(batch)
    assert seen == [len(model.mrl_sizes)]


def test_first_loss_of_dns_uses_every_level(ml100k, monkeypatch):
    model = _model(ml100k, "dns")
    batch = next(iter(ml100k[1]))
    weights = torch.zeros(5)
    weights[0] = 1.0
    model.size_weights = weights  # only the smallest level counts: the loss must still be finite and > 0
    loss = model.calculate_loss(batch)
    assert torch.isfinite(loss) and loss > 0 and F.softplus(torch.zeros(())) > 0
