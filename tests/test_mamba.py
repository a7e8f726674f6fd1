"""Nested Mamba encoder: the PyTorch scan equals the step recurrence, nesting/export exactness, padding,
the CUDA path against the PyTorch path (GPU + mamba_ssm only), bad settings."""

import importlib.util
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_fmrl.config import Config
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.layers.mamba import (
    MambaEncoder,
    check_mamba_impl,
    selective_scan_reference,
    selective_scan_torch,
)
from recbole_fmrl.model.sequential_recommender.fmrlrec import fMRLRec
from recbole_fmrl.submodel.export import export_submodel

ID_ONLY = {
    "modalities": [],
    "use_id_embedding": True,
    "state": "WARNING",
    "encoder": "mamba",
    "dropout_prob": 0.0,
    "attn_dropout_prob": 0.0,
}


def scan_inputs(b, length, e, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, length, e, generator=g, dtype=dtype),
        torch.rand(b, length, e, generator=g, dtype=dtype) * 2,  # Δ > 0
        -torch.rand(e, n, generator=g, dtype=dtype) * 4,  # A < 0
        torch.randn(b, length, n, generator=g, dtype=dtype),
        torch.randn(b, length, n, generator=g, dtype=dtype),
        torch.randn(e, generator=g, dtype=dtype),
    ]


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    length=st.integers(1, 40),
    e=st.integers(1, 6),
    n=st.integers(1, 5),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 999),
)
def test_torch_scan_equals_the_step_recurrence(b, length, e, n, chunk, seed):
    args = scan_inputs(b, length, e, n, seed)
    torch.testing.assert_close(selective_scan_torch(*args, chunk=chunk), selective_scan_reference(*args))


@pytest.mark.parametrize("chunk", [1, 4])
def test_torch_scan_gradients_equal_the_reference(chunk):
    args = [a.requires_grad_() for a in scan_inputs(2, 13, 3, 4, seed=1)]
    grads = torch.autograd.grad(selective_scan_torch(*args, chunk=chunk).square().sum(), args)
    expected = torch.autograd.grad(selective_scan_reference(*args).square().sum(), args)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def lengths_mask(lengths, width):
    return torch.arange(width) < torch.tensor(lengths).unsqueeze(1)


def test_right_padding_is_ignored_and_last_state_matches():
    torch.manual_seed(0)
    encoder = MambaEncoder([4, 8], 2, dropout=0.0, attn_dropout=0.0, d_state=4).eval()
    lengths, width = [7, 2, 5], 7
    mask = lengths_mask(lengths, width)
    x = torch.randn(3, width, 8)
    with torch.no_grad():
        batch = encoder(x, mask)
        last = encoder(x, mask, torch.tensor(lengths) - 1)
        for row, n in enumerate(lengths):  # each sequence alone, unpadded, gives the same states
            alone = encoder(x[row : row + 1, :n], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(batch[row, :n], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last[row], alone[0, -1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mm():
    config = Config("fMRLRec", "mm-sample", config_dict={**ID_ONLY, "hidden_size": 16, "mrl_sizes": [4, 16]})
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    return config, train, test


nestings = st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).map(sorted)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=nestings, seed=st.integers(0, 1000), n_layers=st.integers(1, 2), expand=st.integers(1, 2))
def test_mamba_export_reproduces_nested_scores(mm, sizes, seed, n_layers, expand):
    """Invariant 1 with encoder: mamba: size-m_k scores equal the sliced standalone model's."""
    config, train, test = mm
    for key, value in {
        **ID_ONLY,
        "hidden_size": sizes[-1],
        "mrl_sizes": sizes,
        "n_layers": n_layers,
        "mamba_expand": expand,
        "mamba_d_state": 4,
    }.items():
        config[key] = value
    init_seed(seed, True)
    model = fMRLRec(config, train._dataset).eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        all_sizes = model.full_sort_predict_sizes(batch)
        for k, m in enumerate(sizes):
            sub = export_submodel(model, m)
            assert sub.encoder.blocks[0].mamba.A_log.shape[0] == expand * m
            torch.testing.assert_close(sub.full_sort_predict(batch), all_sizes[k], rtol=1e-4, atol=1e-4)


def test_mamba_fmrlrec_trains(in_tmp):
    from conftest import FAST

    from recbole_fmrl.quick_start import run_recbole_fmrl

    result = run_recbole_fmrl(
        "fMRLRec",
        "mm-sample",
        config_dict={**FAST, **ID_ONLY, "hidden_size": 16, "mrl_sizes": [8, 16], "epochs": 2},
        cli_args=[],
    )
    assert set(result["test_result_by_size"]) == {8, 16}


def test_auto_on_cpu_never_imports_mamba_ssm(monkeypatch):
    real = importlib.util.find_spec

    def guarded(name, *args, **kwargs):
        assert not name.startswith("mamba_ssm"), "auto looked for mamba_ssm on a CPU run"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", guarded)
    encoder = MambaEncoder([4], 1, dropout=0.0, attn_dropout=0.0, impl="auto")
    encoder(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    assert "mamba_ssm" not in sys.modules or torch.cuda.is_available()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs a CUDA GPU and mamba-ssm (pip install '.[cuda]')",
)
def test_cuda_path_equals_torch_path():
    torch.manual_seed(0)
    cuda = MambaEncoder([8, 16], 2, dropout=0.0, attn_dropout=0.0, impl="cuda").cuda().eval()
    torch_path = MambaEncoder([8, 16], 2, dropout=0.0, attn_dropout=0.0, impl="torch").cuda().eval()
    torch_path.load_state_dict(cuda.state_dict())
    mask = lengths_mask([9, 4, 1], 9).cuda()
    x = torch.randn(3, 9, 16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(cuda(x, mask), torch_path(x, mask), rtol=1e-3, atol=1e-3)


def test_bad_mamba_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="mamba_impl='fast' is not valid"):
        check_mamba_impl("fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="mamba_impl=cuda needs a CUDA GPU"):
            check_mamba_impl("cuda")
    with pytest.raises(ConfigError, match="encoder='foo' is not valid"):
        Config("fMRLRec", "mm-sample", config_dict={**ID_ONLY, "encoder": "foo"})
    with pytest.raises(ConfigError, match="mamba_d_state=0"):
        Config("fMRLRec", "mm-sample", config_dict={**ID_ONLY, "mamba_d_state": 0})
