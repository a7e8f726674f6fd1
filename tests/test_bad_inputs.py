"""Bad input through the real command-line entry points, in subprocesses, as a user meets it.

Each case asserts the exit code (2), exactly one ``error:`` line (the last thing printed, no traceback) that
names the problem, and that nothing already on disk was lost or half-written. The malicious files are real:
a pickle whose unpickling would create a marker file, and a portable checkpoint whose config holds code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, random_text_features

from recbole_fmrl.quick_start import run_recbole_fmrl
from recbole_fmrl.submodel.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUN = str(REPO / "run_recbole_fmrl.py")
EVALUATE = ["-m", "recbole_fmrl.cli.evaluate"]
EXPORT = ["-m", "recbole_fmrl.cli.export"]
FEATURES = ["-m", "recbole_fmrl.cli.features"]
AMAZON = ["-m", "recbole_fmrl.cli.amazon"]
TINY = {"hidden_size": 16, "mrl_sizes": [8, 16]}


class Boom:
    """Unpickling this creates ``MARK`` in the working directory: proof that code ran."""

    def __reduce__(self):
        return (Path.touch, (Path("MARK"),))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RECBOLE_FMRL_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=environment
    )


def assert_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one ``error:`` line, printed last, naming every fragment; no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a copy of mm-sample with precomputed features, and a trained nested checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    data = root / "data"
    shutil.copytree(REPO / "dataset_atomic" / "mm-sample", data / "mm-sample")
    features = random_text_features(root, 8)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = run_recbole_fmrl(
            "fMRLRec",
            "mm-sample",
            config_dict={
                **FAST,
                **TINY,
                "data_path": str(data),
                "checkpoint_dir": str(root / "saved"),
                "modalities": ["text"],
                "precomputed_features": features,
                "freeze_features": True,  # frozen features: the checkpoint keeps their digest (tested below)
            },
        )
    finally:
        os.chdir(cwd)
    model_file = Path(result["saved_model_file"])
    report = root / "saved" / f"{model_file.stem}-test-sizes.json"
    assert report.is_file()
    # A real portable export, for the forged-config case (in-process: the CLI is exercised below).
    from recbole_fmrl.cli import export

    assert export.main([f"--model_file={model_file}", "--size=8", f"--output={root / 'sub8.pth'}"]) == 0
    return {"root": root, "data": data, "model_file": model_file, "report": report, "features": features}


# ------------------------------------------------------------------------------------------- security
def test_malicious_pickle_is_refused_by_evaluate_and_export(ws, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"config": Boom(), "state_dict": {}}, evil)
    for args in (
        [*EVALUATE, f"--model_file={evil}"],
        [*EXPORT, f"--model_file={evil}", "--size=8", f"--output={tmp_path / 'o.pth'}"],
    ):
        assert_error(cli(args, tmp_path), "Refusing to unpickle", "--trust")
        assert not (tmp_path / "MARK").exists()
    assert not (tmp_path / "o.pth").exists()


def test_portable_file_with_code_in_its_config_runs_nothing(ws, tmp_path):
    state, portable = read_checkpoint(ws["root"] / "sub8.pth")
    assert portable
    forged = tmp_path / "forged.pth"
    code = "__import__('pathlib').Path('MARK').touch()"
    state["config"] = {**state["config"], "eval_step": code, "topk": code, "learner": code}
    torch.save(state, forged)
    proc = cli([*EVALUATE, f"--model_file={forged}", f"--out_dir={tmp_path}"], tmp_path)
    assert not (tmp_path / "MARK").exists(), "a config string from a file was evaluated"
    assert "Traceback" not in proc.stderr
    # A config that is not plain data at all (a pickled object would be needed) is refused outright.
    state["config"] = {**state["config"], "learner": {"nested": [1, {"x": object.__name__}]}}
    state["model"] = "NotOurs"
    torch.save(state, forged)
    assert_error(
        cli([*EVALUATE, f"--model_file={forged}"], tmp_path), "'NotOurs' is not a recbole-fmrl model"
    )


def test_saved_dataset_pickle_is_not_loaded_without_trust(ws, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    with open(saved / "mm-sample-SequentialDataset.pth", "wb") as f:
        import pickle

        pickle.dump(Boom(), f)
    proc = cli(
        [
            RUN,
            "--model=fMRLRec",
            f"--data_path={ws['data']}",
            "--modalities=[]",
            "--use_id_embedding=True",
            "--epochs=1",
            f"--checkpoint_dir={saved}",
        ],
        tmp_path,
    )
    assert_error(proc, "Refusing to unpickle saved RecBole dataset", "delete it")
    assert not (tmp_path / "MARK").exists()


def test_trusted_recbole_checkpoint_loads_with_the_flag(ws, tmp_path):
    proc = cli([*EVALUATE, f"--model_file={ws['model_file']}", f"--out_dir={tmp_path}", "--trust"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------- nothing is lost
def test_export_refuses_to_overwrite_its_input(ws):
    before = digest(ws["model_file"])
    for output in (ws["model_file"], ws["model_file"].parent / "." / ws["model_file"].name):
        proc = cli(
            [*EXPORT, f"--model_file={ws['model_file']}", "--size=8", f"--output={output}", "--trust"],
            ws["root"],
        )
        assert_error(proc, "is the input checkpoint")
    assert digest(ws["model_file"]) == before


def test_evaluate_without_out_dir_keeps_the_training_report(ws):
    before = digest(ws["report"])
    proc = cli([*EVALUATE, f"--model_file={ws['model_file']}", "--trust", "--split=valid"], ws["root"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert digest(ws["report"]) == before
    assert (ws["report"].parent / f"{ws['model_file'].stem}-valid-reeval-sizes.json").is_file()


def _amazon_files(folder: Path, price="$12.99", bad_line=False, truncate=False):
    reviews = [
        {"reviewerID": f"u{u}", "asin": f"a{i}", "overall": 5.0, "unixReviewTime": 1000 + u * 10 + i}
        for u in range(6)
        for i in range(6)
    ]
    lines = [json.dumps(r) for r in reviews]
    if bad_line:
        lines.insert(20, "{not json")
    payload = ("\n".join(lines) + "\n").encode()
    data = gzip.compress(payload)
    (folder / "reviews.json.gz").write_bytes(data[: len(data) // 2] if truncate else data)
    meta = [
        repr({"asin": f"a{i}", "title": f"Item {i}", "price": price, "categories": [["Beauty"]]})
        for i in range(6)
    ]
    (folder / "meta.json").write_text("\n".join(meta) + "\n")
    return folder / "reviews.json.gz", folder / "meta.json"


def test_amazon_converter_reads_string_prices_and_never_truncates_good_files(tmp_path):
    reviews, meta = _amazon_files(tmp_path)
    out = tmp_path / "out"
    proc = cli(
        [*AMAZON, "--reviews", str(reviews), "--meta", str(meta), "--out", str(out), "--name=toy"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    item = out / "toy" / "toy.item"
    assert item.read_text().splitlines()[1].split("\t")[4] == "12.99"
    good = digest(item), digest(out / "toy" / "toy.inter")
    for kind in ("bad_line", "truncate"):
        reviews, meta = _amazon_files(tmp_path, **{kind: True})
        proc = cli(
            [*AMAZON, "--reviews", str(reviews), "--meta", str(meta), "--out", str(out), "--name=toy"],
            tmp_path,
        )
        assert_error(
            proc,
            f"{reviews}:21: not a review line"
            if kind == "bad_line"
            else f"{reviews}: the compressed file is truncated",
        )
        assert (digest(item), digest(out / "toy" / "toy.inter")) == good
    assert not [p for p in (out / "toy").iterdir() if p.name.endswith(".tmp")]


SHARED = REPO.parent / "shared" / "datasets"


@pytest.mark.skipif(not (SHARED / "amazon2014-5core").is_dir(), reason="needs ../shared/datasets")
def test_amazon_converter_regenerates_the_shipped_atomic_files(tmp_path):
    from recbole_fmrl.data.amazon import convert_joined  # in-process: the CLI path is covered above

    for name in ("beauty", "toys", "sports"):
        folder = convert_joined(SHARED / "amazon2014-5core" / name, tmp_path, f"amazon-{name}")
        for shipped in (SHARED / f"amazon-{name}").iterdir():
            assert digest(folder / shipped.name) == digest(shipped), shipped.name


def test_corrupted_feature_cache_is_reported_and_rebuilt(tmp_path):
    shutil.copytree(REPO / "dataset_atomic" / "mm-sample", tmp_path / "data" / "mm-sample")
    args = [
        *FEATURES,
        f"--data_path={tmp_path / 'data'}",
        "--modalities=[text]",
        f"--feature_cache_dir={tmp_path / 'c'}",
    ]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (cache,) = (tmp_path / "c" / "mm-sample").glob("text-*.npz")
    good = np.load(cache)["features"]
    cache.write_bytes(cache.read_bytes()[:1000])  # a torn write
    again = cli([*args, "--feature_chunk_size=7"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"feature cache {cache} is invalid" in again.stderr
    np.testing.assert_allclose(np.load(cache)["features"], good, atol=1e-5)


# ---------------------------------------------------------------------------- one clear line each
def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _broken_inter(root: Path, name: str, content: bytes | str) -> list[str]:
    _write(root / name / f"{name}.inter", content)
    return [RUN, "--model=BPR", f"--dataset={name}", f"--data_path={root}", "--load_col=None"]


def _cases(ws, tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (argv, fragments the error line must contain)."""
    data = f"--data_path={ws['data']}"
    fm = [RUN, "--model=fMRLRec", data, "--modalities=[]", "--use_id_embedding=True"]
    mrl = [RUN, "--model=MRL4Rec", "--dataset=ml-100k"]
    header = "user_id:token\titem_id:token\trating:float\n"
    truncated = tmp / "truncated.pth"
    truncated.write_bytes(ws["model_file"].read_bytes()[:3000])
    nan = np.load(ws["features"]["text"]["path"])
    nan[3, 2] = np.nan
    np.save(tmp / "nan.npy", nan)
    partial_ids = tmp / "partial_ids.txt"
    ids = Path(ws["features"]["text"]["ids"]).read_text().splitlines()
    np.save(tmp / "partial.npy", np.ones((50, 8), dtype=np.float32))
    partial_ids.write_text("\n".join(ids[:50]) + "\n")
    no_images = tmp / "noimg"
    shutil.copytree(ws["data"], no_images)
    shutil.rmtree(no_images / "mm-sample" / "images")
    bad_yaml = _write(tmp / "bad.yaml", "epochs: [1, 2\n")
    return {
        "mrl_sizes order": (
            [*fm, "--hidden_size=16", "--mrl_sizes=[8,4,16]"],
            ("mrl_sizes [8, 4, 16]", "increasing"),
        ),
        "mrl_sizes text": ([*fm, "--mrl_sizes=big"], ("mrl_sizes='big'", "list of sizes")),
        "eval_size": ([*fm, "--eval_size=5"], ("eval_size=5", "one of mrl_sizes")),
        "loss weights": ([*fm, "--mrl_loss_weights=[1]"], ("mrl_loss_weights", "one non-negative weight")),
        "train_mode": ([*fm, "--train_mode=sometimes"], ("train_mode='sometimes'",)),
        "encoder": ([*fm, "--encoder=foo"], ("encoder='foo' is not valid", "lru", "mamba")),
        "mamba cuda": ([*fm, "--encoder=mamba", "--mamba_impl=cuda"], ("mamba_impl=cuda needs",)),
        "qarm levels": (
            [RUN, "--model=QARMRec", data, "--qarm_rq_levels=0"],
            ("qarm_rq_levels=0", "whole number >= 1"),
        ),
        "modalities": (
            [RUN, "--model=fMRLRec", data, "--modalities=[audio]"],
            ("['audio'] have no features",),
        ),
        "neg sampling": ([*mrl, "--mrl_neg_sampling=hard"], ("mrl_neg_sampling='hard'",)),
        "n_negs": ([*mrl, "--n_negs=0"], ("n_negs=0",)),
        "mrl4rec size key": ([*mrl, "--mrl_sizes=[4,8]"], ("embedding_size (64)",)),
        "unknown model": ([RUN, "--model=NoSuchModel"], ("Unknown model 'NoSuchModel'",)),
        "missing dataset": ([RUN, "--model=BPR", "--dataset=nope", data], ("Dataset 'nope' not found",)),
        "missing config file": ([RUN, "--config_files=nope.yaml"], ("config file nope.yaml does not exist",)),
        "invalid yaml": ([RUN, f"--config_files={bad_yaml}"], ("not valid YAML",)),
        "stray argument": ([RUN, "--model=BPR", "oops"], ("unrecognised argument 'oops'",)),
        "bad header type": (
            _broken_inter(tmp, "hdr", "user_id:token\titem_id:int\n1\t2\n"),
            ("hdr.inter:1", "'item_id:int'", "token, token_seq, float, float_seq"),
        ),
        "text in float": (
            _broken_inter(tmp, "flt", header + "1\t2\t3\n1\t3\tfive\n"),
            ("flt.inter:3", "'rating' is float", "'five'"),
        ),
        "empty file": (_broken_inter(tmp, "empty", b""), ("empty.inter is empty",)),
        "non-utf8": (
            _broken_inter(tmp, "latin", header.encode() + b"1\t2\t3\n1\t\xe9t\xe9\t4\n"),
            ("latin.inter:3", "not utf-8"),
        ),
        "missing checkpoint": ([*EVALUATE, f"--model_file={tmp / 'nope.pth'}"], ("nope.pth does not exist",)),
        "truncated checkpoint": (
            [*EXPORT, f"--model_file={truncated}", "--size=8", f"--output={tmp / 'x.pth'}"],
            ("truncated.pth is not a readable checkpoint",),
        ),
        "export size": (
            [
                *EXPORT,
                f"--model_file={ws['model_file']}",
                "--size=12",
                f"--output={tmp / 'x.pth'}",
                "--trust",
            ],
            ("size=12 is not one of the model's mrl_sizes [8, 16]",),
        ),
        "export missing flag": ([*EXPORT, f"--model_file={ws['model_file']}"], ("--size", "--output")),
        "missing image": (
            [
                *FEATURES,
                f"--data_path={no_images}",
                "--modalities=[image]",
                "--image_missing=error",
                "--image_pretrained=none",
                f"--feature_cache_dir={tmp / 'c'}",
            ],
            ("item i0", "images/i0", "image_missing=zero"),
        ),
        "nan features": (
            [
                *fm,
                "--modalities=[text]",
                "--use_id_embedding=False",
                f"--precomputed_features={{'text': {{'path': '{tmp / 'nan.npy'}', 'ids': '{ws['features']['text']['ids']}'}}}}",
            ],
            ("nan.npy: 1 rows hold NaN/Inf", "row 3 (item i0004)"),
        ),
        "strict features": (
            [
                *fm,
                "--modalities=[text]",
                "--use_id_embedding=False",
                "--strict_features=True",
                f"--precomputed_features={{'text': {{'path': '{tmp / 'partial.npy'}', 'ids': '{partial_ids}'}}}}",
            ],
            ("150 of 200 items have no row", "strict_features"),
        ),
    }


@pytest.fixture(scope="module")
def outcomes(ws, tmp_path_factory):
    """Every case of ``_cases``, run two at a time (each is a fresh interpreter)."""
    tmp = tmp_path_factory.mktemp("cases")
    cases = _cases(ws, tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(cli, argv, tmp) for name, (argv, _) in cases.items()}
        return {name: (futures[name].result(), cases[name][1]) for name in cases}


CASE_NAMES = [
    "mrl_sizes order",
    "mrl_sizes text",
    "eval_size",
    "loss weights",
    "train_mode",
    "encoder",
    "mamba cuda",
    "qarm levels",
    "modalities",
    "neg sampling",
    "n_negs",
    "mrl4rec size key",
    "unknown model",
    "missing dataset",
    "missing config file",
    "invalid yaml",
    "stray argument",
    "bad header type",
    "text in float",
    "empty file",
    "non-utf8",
    "missing checkpoint",
    "truncated checkpoint",
    "export size",
    "export missing flag",
    "missing image",
    "nan features",
    "strict features",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_line(outcomes, name):
    proc, fragments = outcomes[name]
    assert_error(proc, *fragments)


def test_config_errors_come_before_any_data_is_read(outcomes):
    for name in ("mrl_sizes order", "eval_size", "train_mode", "n_negs", "unknown model", "bad header type"):
        proc, _ = outcomes[name]
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr[-1500:])


def test_debug_flag_restores_the_traceback(tmp_path):
    proc = cli([RUN, "--model=NoSuchModel", "--debug"], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UnknownModelError" in proc.stderr
    proc = cli([RUN, "--model=NoSuchModel"], tmp_path, env={"RECBOLE_FMRL_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def test_feature_mismatch_with_checkpoint_is_a_clear_error(ws, tmp_path):
    """The checkpoint stores a digest of its frozen features; other features at load time are refused."""
    original = Path(ws["features"]["text"]["path"])
    saved = original.read_bytes()
    try:
        other = np.load(original)
        other[0] += 1.0
        np.save(original, other)
        proc = cli(
            [*EVALUATE, f"--model_file={ws['model_file']}", "--trust", f"--out_dir={tmp_path}"], tmp_path
        )
        assert_error(proc, "trained on other item features", "feature_seed")
    finally:
        original.write_bytes(saved)
