"""The CUDA paths: each equals its CPU counterpart, and every model trains end to end on a GPU.

CI has no GPU, so this module skips there; it runs where ``torch.cuda.is_available()``. The CPU side of each
comparison is the path the rest of the suite tests (the packed scan, the row sub-chunked loss), so a CUDA
result that equals it is as right as the CPU one.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import FAST
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_fmrl.config import Config
from recbole_fmrl.model.layers.mamba import MambaEncoder
from recbole_fmrl.model.layers.matryoshka import MatryoshkaLayerNorm
from recbole_fmrl.model.layers.nested_loss import nested_cross_entropy, nested_cross_entropy_reference
from recbole_fmrl.model.sequential_recommender.fmrlrec import fMRLRec
from recbole_fmrl.quick_start import run_recbole_fmrl
from recbole_fmrl.submodel.export import export_submodel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ID_ONLY = {"modalities": [], "use_id_embedding": True, "state": "WARNING", "hidden_size": 64}
SIZES = [8, 16, 32, 64]


def _loss_and_grads(fn, query, items, targets, sizes, weights, **kwargs):
    q, e = query.clone().requires_grad_(), items.clone().requires_grad_()
    loss = fn(q, e, targets, sizes, weights, **kwargs)
    loss.backward()
    return [loss.detach(), q.grad, e.grad]


@pytest.mark.parametrize("chunk", [None, 7])
def test_fused_loss_on_cuda_equals_the_reference_and_the_cpu_loss(chunk):
    """The paper's sizes on a catalogue wider than a chunk: the CUDA loss skips the CPU's row sub-chunks."""
    gen = torch.Generator().manual_seed(0)
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    query = torch.randn(300, 1024, generator=gen) / 8
    items = torch.randn(3000, 1024, generator=gen) / 8
    targets = torch.randint(0, 3000, (300,), generator=gen)
    weights = torch.full((len(sizes),), 1 / len(sizes))
    cpu = _loss_and_grads(nested_cross_entropy, query, items, targets, sizes, weights, chunk_size=chunk)
    on_cuda = [t.cuda() for t in (query, items, targets)]
    fused = _loss_and_grads(nested_cross_entropy, *on_cuda, sizes, weights.cuda(), chunk_size=chunk)
    ref = _loss_and_grads(nested_cross_entropy_reference, *on_cuda, sizes, weights.cuda())
    for a, b, c in zip(fused, ref, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def mm():
    config = Config("fMRLRec", "mm-sample", config_dict={**ID_ONLY, "mrl_sizes": SIZES}, cli_args=[])
    train, _, test = data_preparation(config, create_dataset(config))
    return config, train, test


def _model(mm, **extra) -> fMRLRec:
    config, train, _ = mm
    for key, value in {**ID_ONLY, "mrl_sizes": SIZES, "encoder": "lru", **extra}.items():
        config[key] = value
    init_seed(3, True)
    return fMRLRec(config, train._dataset).eval()  # no dropout: both devices see the same network


@pytest.mark.parametrize("encoder", ["lru", "mamba"])
def test_model_on_cuda_equals_the_model_on_cpu(mm, encoder):
    """The LRU's log-depth scan over the padded batch (CUDA) against its packed scan (CPU), and Mamba's
    log-depth chunks against its step loop: same loss, gradients and scores at every size."""
    cpu = _model(mm, encoder=encoder, mamba_impl="torch")
    gpu = copy.deepcopy(cpu).cuda()
    train_batch, (test_batch, *_) = next(iter(mm[1])), next(iter(mm[2]))
    losses = []
    for model, batch in ((cpu, train_batch), (gpu, train_batch.to("cuda"))):
        model.zero_grad()
        losses.append(model.calculate_loss(batch))
        losses[-1].backward()
    torch.testing.assert_close(losses[1].detach().cpu(), losses[0].detach(), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(gpu.named_parameters(), cpu.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():
        on_cpu = cpu.full_sort_predict_sizes(test_batch)
        on_gpu = gpu.full_sort_predict_sizes(test_batch.to("cuda"))
        for a, b in zip(on_gpu, on_cpu, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
        for k, m in enumerate(SIZES):  # an export made on the GPU scores as the nested model's size m
            sub = export_submodel(gpu, m)
            torch.testing.assert_close(
                sub.full_sort_predict(test_batch.to("cuda")), on_gpu[k], rtol=1e-4, atol=1e-4
            )


def test_nested_layer_norm_is_deterministic_on_cuda_by_default():
    """Per-block ``F.layer_norm`` rather than a scatter (``index_add_``, atomic on CUDA): two backward passes
    give equal gradients without PyTorch's deterministic mode."""
    norm = MatryoshkaLayerNorm([8, 16, 32, 64, 1024]).cuda()
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    upstream = torch.randn(4096, 1024, device="cuda")
    grads = []
    for _ in range(2):
        norm.zero_grad()
        x.grad = None
        (norm(x) * upstream).sum().backward()
        grads.append([x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_training_step_on_cuda_is_deterministic(mm, monkeypatch):
    """With PyTorch's deterministic mode on, a step raises if any op has no deterministic CUDA kernel, and two
    steps give equal gradients."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    model = _model(mm).cuda().train()
    batch = next(iter(mm[1])).to("cuda")
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(0)  # the same dropout masks
            model.zero_grad()
            model.calculate_loss(batch).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_mamba_auto_runs_on_cuda_without_mamba_ssm(monkeypatch):
    """``mamba_impl: auto`` on a GPU falls back to the PyTorch scan when mamba-ssm is missing."""
    from recbole_fmrl.model.layers import mamba

    monkeypatch.setattr(mamba, "mamba_ssm_available", lambda: False)
    torch.manual_seed(0)
    encoder = MambaEncoder([8, 16], 1, dropout=0.0, attn_dropout=0.0, impl="auto").cuda().eval()
    reference = copy.deepcopy(encoder).cpu()
    x = torch.randn(3, 9, 16)
    mask = torch.arange(9) < torch.tensor([9, 4, 1]).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(x.cuda(), mask.cuda()).cpu(), reference(x, mask), rtol=1e-4, atol=1e-5
        )


@pytest.fixture
def text_features(mm, tmp_path) -> dict:
    """MiniLM-shaped (384-d) precomputed text features: the GPU machine has no text encoder to run."""
    tokens = list(mm[1]._dataset.field2id_token["item_id"][1:])
    matrix = np.random.default_rng(0).normal(size=(len(tokens), 384)).astype(np.float32)
    np.save(tmp_path / "text.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(tokens))
    text = {"text": {"path": str(tmp_path / "text.npy"), "ids": str(tmp_path / "ids.txt")}}
    return {"modalities": ["text"], "precomputed_features": text}


@pytest.mark.parametrize(
    "model, extra, with_text",
    [
        # No hidden_size: device_profile auto keeps the paper's D=1024 and 8 sizes on a GPU.
        ("fMRLRec", {"train_batch_size": 32}, True),
        ("fMRLRec", {**ID_ONLY, "encoder": "mamba", "mrl_sizes": [16, 64]}, False),
        ("MRL4Rec", {}, False),
        ("QARMRec", {"qarm_align_epochs": 1}, True),
    ],
)
def test_every_model_trains_and_tests_on_cuda(in_tmp, text_features, model, extra, with_text):
    extra = {**extra, **(text_features if with_text else {})}
    torch.cuda.reset_peak_memory_stats()
    result = run_recbole_fmrl(
        model, "mm-sample", config_dict={**FAST, "checkpoint_dir": str(in_tmp), **extra}, cli_args=[]
    )
    assert torch.cuda.max_memory_allocated() > 0  # the run used the GPU (use_gpu and gpu_id left as default)
    test = result["test_result"]
    assert all(math.isfinite(v) for v in test.values()) and test["ndcg@10"] > 0
    if model == "fMRLRec":
        sizes = extra.get("mrl_sizes", [8, 16, 32, 64, 128, 256, 512, 1024])
        assert [int(m) for m in result["test_result_by_size"]] == sizes
