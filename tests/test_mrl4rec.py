"""MRL4Rec: per-level hard negatives, the Matryoshka BPR loss, candidate validity, both backbones train."""

import pytest
import torch
from conftest import FAST
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.utils import init_seed
from torch.nn import functional as F

from recbole_fmrl.config import Config
from recbole_fmrl.evaluation import evaluate_all_sizes
from recbole_fmrl.model.general_recommender.mrl4rec import MRL4Rec
from recbole_fmrl.quick_start import run_recbole_fmrl
from recbole_fmrl.submodel import export_submodel
from recbole_fmrl.utils import get_trainer


@pytest.fixture(scope="module")
def ml100k():
    config = Config("MRL4Rec", "ml-100k", config_dict={"state": "WARNING", "eval_batch_size": 4096})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, train, test


def build(ml100k, **extra):
    config, train, _ = ml100k
    base = {
        "n_layers": 0,
        "mrl_neg_sampling": "mns",
        "n_negs": 8,
        "mrl_sizes": [4, 8, 16, 32, 64],
        "embedding_size": 64,
        "mrl_loss_weights": None,
    }
    for key, value in {**base, **extra}.items():
        config[key] = value
    init_seed(0, True)
    return MRL4Rec(config, train._dataset)


def test_level_negative_is_argmax_of_level_prefix_scores(ml100k, monkeypatch):
    model = build(ml100k)
    users = torch.tensor([1, 2, 3, 4])
    fixed = model.sample_candidates(users, 5 * model.n_negs)
    monkeypatch.setattr(model, "sample_candidates", lambda u, n: fixed)
    user_all, item_all = model.forward()
    negs = model.level_negatives(user_all[users], item_all, users)
    cand = fixed.view(4, 5, model.n_negs)
    for k, m in enumerate(model.mrl_sizes):
        scores = (user_all[users, None, :m] * item_all[cand[:, k], :m]).sum(-1)
        assert torch.equal(negs[:, k], cand[:, k].gather(1, scores.argmax(1, keepdim=True)).squeeze(1))


def test_candidates_never_include_training_positives(ml100k):
    config, train, _ = ml100k
    model = build(ml100k)
    history = train._dataset.inter_matrix(form="csr")
    users = torch.arange(1, model.n_users).repeat_interleave(4)
    cand = model.sample_candidates(users, 64)
    seen = torch.from_numpy(history.toarray()).bool()[users.unsqueeze(1), cand]
    assert not seen.any()
    assert (cand >= 1).all() and (cand < model.n_items).all()


def test_loss_equals_reference_computation(ml100k, monkeypatch):
    model = build(ml100k, mrl_loss_weights=[1, 2, 3, 4, 5])
    users, pos = torch.tensor([1, 5, 9]), torch.tensor([10, 20, 30])
    negs = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54], [60, 61, 62, 63, 64]])
    monkeypatch.setattr(model, "level_negatives", lambda u_e, items, u: negs)
    loss = model.calculate_loss(Interaction({"user_id": users, "item_id": pos}))
    u_w, i_w = model.user_embedding.weight, model.item_embedding.weight
    weights = torch.tensor([1, 2, 3, 4, 5.0]) / 15
    expected = 0.0
    for k, m in enumerate(model.mrl_sizes):
        s_pos = (u_w[users, :m] * i_w[pos, :m]).sum(-1)
        s_neg = (u_w[users, :m] * i_w[negs[:, k], :m]).sum(-1)
        expected += weights[k] * F.softplus(s_neg - s_pos).mean()
    reg = (u_w[users].norm() ** 2 + i_w[pos].norm() ** 2 + i_w[negs].norm() ** 2) / 2
    expected += model.reg_weight * reg / 3
    torch.testing.assert_close(loss, expected)


def test_all_sizes_scores_match_export(ml100k):
    model = build(ml100k, n_layers=2).eval()
    batch = Interaction({"user_id": torch.arange(1, 20)})
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate(model.mrl_sizes):
            sub = export_submodel(model, m).eval()
            torch.testing.assert_close(
                sub.full_sort_predict(batch).view(19, -1), all_sizes[k], rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("n_layers", [0, 2])
def test_backbone_trains_and_beats_a_random_model(ml100k, in_tmp, n_layers):
    config, train, test = ml100k
    untrained = build(ml100k, n_layers=n_layers)
    trainer = get_trainer(config["MODEL_TYPE"], "MRL4Rec")(config, untrained)
    trainer.eval_collector.data_collect(train)
    random_ndcg = evaluate_all_sizes(trainer, test)[64]["ndcg@10"]
    result = run_recbole_fmrl(
        "MRL4Rec",
        "ml-100k",
        config_dict={
            **FAST,
            "epochs": 2,
            "n_layers": n_layers,
            "checkpoint_dir": str(in_tmp),
            "eval_batch_size": 4096,
            "n_negs": 4,
            "learning_rate": 0.005,
            "train_batch_size": 4096,
        },
    )
    by_size = result["test_result_by_size"]
    assert list(by_size) == [4, 8, 16, 32, 64]
    assert by_size[64]["ndcg@10"] > 3 * random_ndcg and by_size[64]["ndcg@10"] > 0.05
    assert by_size[64]["ndcg@10"] == pytest.approx(result["test_result"]["ndcg@10"])


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"mrl_neg_sampling": "hard"}, "mrl_neg_sampling"),
        ({"n_negs": 0}, "n_negs"),
        ({"mrl_sizes": [4, 8]}, "must equal embedding_size \\(64\\)"),
    ],
)
def test_bad_config_is_rejected(ml100k, extra, match):
    with pytest.raises(ValueError, match=match):
        build(ml100k, **extra)


def test_one_pass_evaluation_equals_per_size_recbole_evaluation(ml100k):
    """The general-recommender path (users' training items masked via history_index) at every size."""
    config, train, test = ml100k
    model = build(ml100k, n_layers=1).eval()
    trainer = get_trainer(config["MODEL_TYPE"], "MRL4Rec")(config, model)
    trainer.eval_collector.data_collect(train)
    by_size = evaluate_all_sizes(trainer, test)
    for size in model.mrl_sizes:
        model.eval_size = size
        expected = trainer.evaluate(test, load_best_model=False)
        assert dict(by_size[size]) == dict(expected)
