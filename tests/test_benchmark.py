"""The benchmark harness (python -m recbole_fmrl.benchmark) and run_recbole_fmrl's training summary."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from conftest import FAST
from hypothesis import given, settings
from hypothesis import strategies as st
from recbole.utils import early_stopping

from recbole_fmrl import benchmark
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.quick_start import TrainingClock, best_epoch, run_recbole_fmrl

SMALL_FMRL = "modalities: []\nuse_id_embedding: True\nhidden_size: 32\nmrl_sizes: [8, 16, 32]\n"


def test_harness_tables_plots_resume_and_failed_rows(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_FMRL)
    out = tmp_path / "bench"
    args = [
        "--dataset=mm-sample",
        "--epochs=1",
        f"--config_files={config}",
        f"--out={out}",
        "--state=WARNING",
    ]
    assert benchmark.main(["--models=fMRLRec,BPR,Pop", *args]) == 0
    table = (out / "results.md").read_text()
    assert "### sequential models" in table and "### general models" in table
    for model in ("fMRLRec", "BPR", "Pop", "fMRLRec @ 8", "fMRLRec @ 32"):
        assert f"| {model} |" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["model"] for r in rows} >= {"fMRLRec", "BPR", "Pop", "fMRLRec @ 16"}
    assert all(float(r["test ndcg@10"]) >= 0 for r in rows)
    for png in ("metric_vs_size.png", "metric_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "runs" / "BPR.json").read_text())
    assert saved["spec"]["config"]["epochs"] == 1 and saved["epochs"] == 1 and saved["params"] > 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["environment"]["torch"] and len(summary["rows"]) == 3

    # --resume keeps finished models; a model that fails is a row, and the others are kept.
    capsys.readouterr()
    assert benchmark.main(["--models=fMRLRec,BPR,Pop,MRL4Rec", *args, "--resume", "--embedding_size=33"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept from") == 3
    assert "MRL4Rec: failed: " in printed and "embedding_size" in printed
    assert "| MRL4Rec | failed: " in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models=SASRec", "--epochs=0"], "--epochs=0 must be >= 1"),
        (["--models=SASRec", "--resume"], "--resume needs --out"),
        (["--models=SASRecc"], "Unknown model 'SASRecc'"),
        (["--models=,"], "--models is empty"),
        (["--models=SASRec", "--time_budget_min=-1"], "must be a positive number of minutes"),
    ],
)
def test_harness_bad_inputs_are_one_line(argv, message, capsys, tmp_path):
    assert benchmark.main([*argv, f"--out={tmp_path}"] if "--resume" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_time_budget_stops_after_the_epoch_and_tests_the_best_model(in_tmp):
    config = {
        **FAST,
        "modalities": [],
        "use_id_embedding": True,
        "hidden_size": 16,
        "mrl_sizes": [8, 16],
        "epochs": 5,
        "time_budget": 1e-6,
        "checkpoint_dir": str(in_tmp),
    }
    result = run_recbole_fmrl("fMRLRec", "mm-sample", config_dict=config, cli_args=[])
    assert result["stopped_by"] == "time_budget" and result["epochs"] == 1 and result["best_epoch"] == 0
    assert len(result["valid_history"]) == 1 and result["test_result"]["ndcg@10"] >= 0
    assert result["params"] > 0 and result["train_seconds"] > 0


def test_a_child_writes_its_record_after_every_epoch_so_a_killed_run_keeps_it(in_tmp, monkeypatch):
    config = {
        **FAST, "modalities": [], "use_id_embedding": True, "hidden_size": 16, "mrl_sizes": [8, 16],
        "epochs": 2, "checkpoint_dir": str(in_tmp),
    }  # fmt: skip
    progress = in_tmp / "point.progress.json"
    spec = {
        "model": "fMRLRec", "dataset": "mm-sample", "config_files": [], "config": config, "variant": "v",
        "point": 0, "progress_file": str(progress),
    }  # fmt: skip
    seen = []
    real_write = benchmark.atomic_write_bytes

    def write(path, data):
        seen.append(json.loads(data))
        return real_write(path, data)

    monkeypatch.setattr(benchmark, "atomic_write_bytes", write)
    result = benchmark.run_model(spec)
    assert [r["epochs"] for r in seen] == [1, 2] and result["stopped_by"] == "epochs"
    last = json.loads(progress.read_text())
    assert last == seen[-1] and last["stopped_by"] == "interrupted" and last["variant"] == "v"
    assert last["valid_history"] == result["valid_history"] and last["best_epoch"] == result["best_epoch"]
    assert last["best_valid_score"] == result["best_valid_score"] and last["train_seconds"] > 0
    assert Path(last["saved_model_file"]).is_file() and last["wall_seconds"] >= 0


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.4]), min_size=1, max_size=12),
    bigger=st.booleans(),
)
def test_best_epoch_is_the_checkpoint_recbole_keeps(scores, bigger):
    # Rounded valid scores tie often; RecBole saves on every tie with the best, so the last one is tested.
    best, kept = float("-inf") if bigger else float("inf"), None
    for epoch, score in enumerate(scores):
        best, _, _, update = early_stopping(score, best, 0, 100, bigger=bigger)
        kept = epoch if update else kept
    assert best_epoch(scores, bigger) == kept


def test_a_tied_best_epoch_names_the_later_epoch_in_the_record():
    clock = TrainingClock(None)
    for epoch, score in enumerate([0.1, 0.3, 0.2, 0.3, 0.25]):
        clock(epoch, score)
    clock.stop()
    trainer = type("T", (), {"cur_step": 1, "stopping_step": 5})()
    summary = clock.summary(trainer, {"valid_metric_bigger": True})
    assert summary["best_epoch"] == 3 and summary["epochs"] == 5 and summary["stopped_by"] == "epochs"


def test_bad_time_budget_is_a_config_error(in_tmp):
    with pytest.raises(ConfigError, match="time_budget='soon' must be a positive number of minutes"):
        run_recbole_fmrl("Pop", "mm-sample", config_dict={**FAST, "time_budget": "soon"}, cli_args=[])


def _fake_accuracy_runs(monkeypatch) -> list:
    """Replace each point's training process by a record of what it was asked to train (valid score rises with the point)."""
    trained = []

    def fake_run(spec, cwd=None):
        trained.append((spec["variant"], spec["point"], spec["config"]["train_batch_size"]))
        return _fake_result(spec)

    monkeypatch.setattr(benchmark, "run_in_subprocess", fake_run)
    return trained


def _fake_result(spec) -> dict:
    return {
        "best_valid_score": 0.01 * (spec["point"] + 1),
        "test_result": {"ndcg@10": 0.02, "recall@10": 0.04},
        "epochs": 1,
        "best_epoch": 1,
        "stopped_by": "epochs",
        "train_seconds": 60.0,
    }


def test_accuracy_script_trains_the_picked_grid_points_and_resumes(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    trained = _fake_accuracy_runs(monkeypatch)
    argv = ["--variants=fMRLRec", f"--out={tmp_path}", "--grid_points=1,2"]
    assert accuracy.main(argv) == 0
    grid = accuracy.VARIANTS["fMRLRec"][2]
    assert sorted(trained) == [("fMRLRec", k, grid[k]["train_batch_size"]) for k in (1, 2)]
    assert json.loads((tmp_path / "summary.json").read_text())["best"]["fMRLRec"]["point"] == 2
    rows = [
        line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| fMRLRec |")
    ]
    # The best point's row, then one row per point tried with its own grid values and valid score.
    assert len(rows) == 3
    assert rows[1].startswith(f"| fMRLRec | 1 | {grid[1]['learning_rate']} | {grid[1]['dropout_prob']} | ")
    assert "0.0200 (1)" in rows[1] and "0.0300 (1)" in rows[2]
    # A rerun keeps finished points instead of retraining them.
    assert accuracy.main(argv) == 0 and len(trained) == 2
    for bad, message in (("9", "indices must lie in 0.."), ("x", "give grid indices")):
        with pytest.raises(SystemExit):
            accuracy.main(["--variants=fMRLRec", f"--out={tmp_path}", f"--grid_points={bad}"])
        assert message in capsys.readouterr().err


def test_accuracy_summary_shows_every_size_on_valid_beside_test():
    from benchmarks import accuracy

    def sized(ndcg):
        return {"8": {"ndcg@10": ndcg / 2, "recall@10": ndcg}, "16": {"ndcg@10": ndcg, "recall@10": 2 * ndcg}}

    base = {"config": {}, "epochs": 3, "best_epoch": 2, "stopped_by": "early_stopping", "train_seconds": 60.0}
    with_valid = {
        **base,
        "variant": "fMRLRec",
        "point": 0,
        "best_valid_score": 0.05,
        "test_result": {"ndcg@10": 0.04, "recall@10": 0.08},
        "test_result_by_size": sized(0.04),
        "valid_result_by_size": sized(0.05),
    }
    older = {**with_valid, "variant": "fMRLRec-std", "valid_result_by_size": None}
    _, text = accuracy.summarise([with_valid, older], "amazon-beauty")
    tables = text.split("every nesting size")
    assert (
        "| 8 | 0.0250 | 0.0200 | 0.0400 |" in tables[1] and "| 16 | 0.0500 | 0.0400 | 0.0800 |" in tables[1]
    )
    assert "| 16 | n/a | 0.0400 | 0.0800 |" in tables[2]
    assert "best valid N@10 at this point: 16 (test N@10 / R@10 0.0400 / 0.0800)" in tables[1]
    assert "best valid N@10 at this point" not in tables[2]
    smaller_better = {**with_valid, "valid_result_by_size": {"8": {"ndcg@10": 0.06}, "16": {"ndcg@10": 0.05}}}
    _, text = accuracy.summarise([smaller_better], "amazon-beauty")
    assert "best valid N@10 at this point: 8 (test N@10 / R@10 0.0200 / 0.0400)" in text


def test_accuracy_points_of_one_model_save_and_resume_in_their_own_folders(tmp_path):
    """RecBole names checkpoints by model and start second: two points trained together must not share one."""
    import argparse

    from benchmarks import accuracy

    args = argparse.Namespace(
        data_path="d", epochs=1, stopping_step=1, budget=1.0, threads=1, dataset="x", profile="cpu", seed=None
    )
    grid = accuracy.VARIANTS["SASRec"][2]
    folders = {
        k: accuracy._spec(args, "SASRec", k, grid[k], tmp_path)["config"]["checkpoint_dir"] for k in (3, 5)
    }
    assert folders[3] != folders[5] and all(Path(f).parent == tmp_path / "saved" for f in folders.values())
    earlier = tmp_path / "earlier.pth"
    earlier.write_bytes(b"checkpoint")
    resumed = accuracy._resume_spec(
        {"variant": "SASRec", "point": 5, "saved_model_file": str(earlier), "best_epoch": 2}, tmp_path
    )
    assert Path(resumed["resume_file"]) == Path(folders[5]) / "earlier.pth"
    assert Path(resumed["resume_file"]).read_bytes() == b"checkpoint"
    assert resumed["resumed_after_epoch"] == 2
    # A run that kept its last epoch trains on from there; the best checkpoint is copied beside it, for the test.
    last = tmp_path / "earlier-last.pth"
    last.write_bytes(b"last epoch")
    resumed = accuracy._resume_spec(
        {"variant": "SASRec", "point": 5, "saved_model_file": str(earlier), "last_checkpoint_file": str(last),
         "epochs": 6, "best_epoch": 2},
        tmp_path,
    )  # fmt: skip
    assert Path(resumed["resume_file"]) == Path(folders[5]) / "earlier-last.pth"
    assert Path(resumed["resume_file"]).read_bytes() == b"last epoch"
    assert (Path(folders[5]) / "earlier.pth").read_bytes() == b"checkpoint"
    assert (
        resumed["resumed_after_epoch"] == 5
        and accuracy._spec(args, "SASRec", 5, grid[5], tmp_path)["config"]["save_last_checkpoint"]
    )


def test_accuracy_script_picks_grid_points_per_variant(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    trained = _fake_accuracy_runs(monkeypatch)
    # A plain index applies to every variant, VARIANT:K to one; repeats are trained once.
    argv = ["--variants=SASRec,fMRLRec", f"--out={tmp_path}", "--grid_points=0,SASRec:1,fMRLRec:2,fMRLRec:2"]
    assert accuracy.main(argv) == 0
    grids = {v: accuracy.VARIANTS[v][2] for v in ("SASRec", "fMRLRec")}
    expected = [("SASRec", 0), ("SASRec", 1), ("fMRLRec", 0), ("fMRLRec", 2)]
    assert sorted(trained) == sorted((v, k, grids[v][k]["train_batch_size"]) for v, k in expected)
    assert sorted(p.name for p in tmp_path.glob("*-*.json")) == sorted(f"{v}-{k}.json" for v, k in expected)
    for bad, message in (
        ("SASRec:9", "SASRec's indices must lie in 0.."),
        ("LRURec-id:1", "'LRURec-id' is not among --variants"),
        ("SASRec:x", "give grid indices"),
        (",", "give grid indices"),
    ):
        with pytest.raises(SystemExit):
            accuracy.main(["--variants=SASRec,fMRLRec", f"--out={tmp_path}", f"--grid_points={bad}"])
        assert message in capsys.readouterr().err


def test_accuracy_paper_profile_trains_fmrlrec_with_the_paper_defaults_and_grid(tmp_path, monkeypatch):
    """--profile=paper: fMRLRec without the CPU profile (device_profile: paper, so on a CPU too) over the
    grid around the official lr and batch; SASRec's grid and settings do not change."""
    from benchmarks import accuracy
    from recbole_fmrl.config import Config

    specs = []
    monkeypatch.setattr(
        benchmark, "run_in_subprocess", lambda spec, cwd=None: specs.append(spec) or _fake_result(spec)
    )
    argv = [
        "--variants=SASRec,fMRLRec",
        f"--out={tmp_path}",
        "--grid_points=SASRec:1,fMRLRec:5",
        "--profile=paper",
    ]
    assert accuracy.main(argv) == 0
    sasrec, fmrlrec = sorted(specs, key=lambda spec: spec["variant"])
    assert sasrec["config_files"] == [] and "device_profile" not in sasrec["config"]
    assert sasrec["config"]["train_batch_size"] == accuracy.VARIANTS["SASRec"][2][1]["train_batch_size"]
    assert fmrlrec["config_files"] == [] and fmrlrec["config"]["device_profile"] == "paper"
    assert (fmrlrec["config"]["learning_rate"], fmrlrec["config"]["train_batch_size"]) == (1e-3, 128)
    settings = {k: v for k, v in fmrlrec["config"].items() if k != "data_path"}  # mm-sample ships with us
    config = Config("fMRLRec", "mm-sample", config_dict={**settings, "use_gpu": False}, cli_args=[])
    assert config["hidden_size"] == 1024 and config["mrl_sizes"][-1] == 1024
    assert config["train_batch_size"] == 128 and config["lr_scheduler"] == "cosine"


def test_accuracy_seed_reaches_every_point_and_is_recbole_s_own_by_default(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    specs = []
    monkeypatch.setattr(
        benchmark, "run_in_subprocess", lambda spec, cwd=None: specs.append(spec) or _fake_result(spec)
    )
    argv = ["--variants=SASRec,fMRLRec", "--grid_points=0"]
    assert accuracy.main([*argv, f"--out={tmp_path / 'default'}"]) == 0
    assert [s for s in specs if "seed" in s["config"]] == []
    specs.clear()
    assert accuracy.main([*argv, f"--out={tmp_path / 'seed7'}", "--seed=7"]) == 0
    assert len(specs) == 2 and {s["config"]["seed"] for s in specs} == {7}
    saved = json.loads((tmp_path / "seed7" / "fMRLRec-0.json").read_text())
    assert saved["config"]["seed"] == 7
    with pytest.raises(SystemExit):
        accuracy.main([*argv, f"--out={tmp_path / 'bad'}", "--seed=one"])
    # A rerun into a folder of another seed would summarise two seeds as one grid.
    with pytest.raises(SystemExit):
        accuracy.main([*argv, f"--out={tmp_path / 'seed7'}"])
    assert "SASRec point 0 was trained with --seed=7; use it here too" in capsys.readouterr().err
    assert accuracy.main([*argv, f"--out={tmp_path / 'seed7'}", "--seed=7"]) == 0 and len(specs) == 2


def test_accuracy_sasrec_variants_share_one_grid_and_keep_the_feed_forward_at_four_times_the_width():
    """SASRec-h128 is SASRec with only the width changed, so its grid points compare with SASRec's."""
    from benchmarks import accuracy
    from recbole_fmrl.config import Config

    sasrec = {name: spec for name, spec in accuracy.VARIANTS.items() if spec[0] == "SASRec"}
    assert set(sasrec) == {"SASRec", "SASRec-h128"}
    assert sasrec["SASRec"][2] == sasrec["SASRec-h128"][2]
    for name, (model, fixed, _) in sasrec.items():
        config = Config(model, "ml-100k", config_dict={"state": "WARNING", "use_gpu": False, **fixed})
        width = int(name.partition("-h")[2] or 64)
        assert (config["hidden_size"], config["inner_size"]) == (width, 4 * width), name


def test_accuracy_variants_pin_their_item_tower_whatever_the_cpu_profile_says():
    """Each fMRLRec variant's recorded numbers stay reproducible when the CPU profile's tower changes."""
    from benchmarks import accuracy
    from recbole_fmrl.config import Config

    towers = {}
    for name, (model, fixed, _) in accuracy.VARIANTS.items():
        if model != "fMRLRec":
            continue
        config = Config(
            model,
            "mm-sample",
            config_file_list=[accuracy.CPU_PROFILE],
            config_dict={"state": "WARNING", "use_gpu": False, **fixed},
        )
        towers[name] = (config["freeze_features"], config["use_id_embedding"], bool(config["modalities"]))
        assert {"freeze_features", "use_id_embedding"} <= set(fixed) or not config["modalities"], name
        assert config["feature_norm"] == ("standardize" if "-std" in name else "none"), name
        width = {"-d512": 512, "-d1024": 1024}.get(name[name.rfind("-") :], 256)
        assert config["hidden_size"] == width, name
        assert config["mrl_sizes"][-1] == config["hidden_size"], name
        assert config["n_layers"] == (2 if name.endswith("-2blocks") else 1), name
        scale = re.search(r"-flr([0-9.]+)", name)
        assert config["feature_lr_scale"] == float(scale[1] if scale else 1), name
    assert towers["fMRLRec"] == (False, False, True)
    assert towers["fMRLRec-frozen"] == (True, False, True)
    assert towers["fMRLRec-id"] == (False, True, True)
    assert towers["fMRLRec-frozen-id"] == (True, True, True)
    assert (
        towers["fMRLRec-std"] == towers["fMRLRec"]
        and towers["fMRLRec-frozen-std"] == towers["fMRLRec-frozen"]
        and towers["fMRLRec-d512"] == towers["fMRLRec-std-d512"] == towers["fMRLRec"]
        and towers["fMRLRec-d1024"] == towers["fMRLRec-2blocks"] == towers["fMRLRec"]
        and towers["fMRLRec-flr0.2"] == towers["fMRLRec-flr0.5"] == towers["fMRLRec"]
        and towers["fMRLRec-flr0.2-d512"] == towers["fMRLRec"]
    )
    assert towers["LRURec-id"][1:] == (True, False)


def test_accuracy_continue_from_trains_budget_stopped_points_on_and_keeps_the_rest(
    tmp_path, monkeypatch, capsys
):
    from benchmarks import accuracy

    first, later = tmp_path / "first", tmp_path / "later"
    checkpoint = first / "saved" / "SASRec.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    record = {"test_result": {"ndcg@10": 0.02, "recall@10": 0.04}, "saved_model_file": str(checkpoint)}
    # SASRec: stopped by the budget after 4 epochs, its best (saved) epoch 2; fMRLRec: converged.
    (first / "SASRec-1.json").write_text(json.dumps({
        **record, "variant": "SASRec", "point": 1, "config": {}, "epochs": 4, "best_epoch": 2,
        "stopped_by": "time_budget", "train_seconds": 100.0, "wall_seconds": 110.0, "best_valid_score": 0.3,
        "best_valid_result": {"ndcg@10": 0.3}, "valid_history": [0.1, 0.2, 0.3, 0.25],
    }))  # fmt: skip
    converged = {
        **record, "variant": "fMRLRec", "point": 0, "config": {}, "epochs": 9, "best_epoch": 3,
        "stopped_by": "early_stopping", "train_seconds": 50.0, "wall_seconds": 60.0, "best_valid_score": 0.5,
        "best_valid_result": {"ndcg@10": 0.5}, "valid_history": [0.5] * 9,
    }  # fmt: skip
    (first / "fMRLRec-0.json").write_text(json.dumps(converged))
    asked = []

    def fake_run(spec, cwd=None):
        asked.append(spec)
        assert Path(spec["resume_file"]).read_bytes() == b"weights" and spec["trust_resume_file"]
        return {
            "best_valid_score": 0.4, "best_valid_result": {"ndcg@10": 0.4}, "test_result": record["test_result"],
            "epochs": 7, "best_epoch": 4, "stopped_by": "early_stopping", "train_seconds": 30.0,
            "wall_seconds": 31.0, "valid_history": [0.26, 0.4, 0.35, 0.3],
        }  # fmt: skip

    monkeypatch.setattr(benchmark, "run_in_subprocess", fake_run)
    argv = ["--variants=SASRec,fMRLRec", "--grid_points=SASRec:1,fMRLRec:0", f"--continue_from={first}"]
    assert accuracy.main([*argv, f"--out={later}"]) == 0
    assert [spec["variant"] for spec in asked] == ["SASRec"]  # the converged point is not trained again
    # A copy in the point's own folder: the first run's file stays.
    assert Path(asked[0]["resume_file"]).parent == later / "saved" / "SASRec-1"
    sasrec = json.loads((later / "SASRec-1.json").read_text())
    # Epochs 0-2 from the first run (up to its checkpoint), then 3-6 trained now; times add up.
    assert sasrec["valid_history"] == [0.1, 0.2, 0.3, 0.26, 0.4, 0.35, 0.3]
    assert sasrec["best_epoch"] == 4 and sasrec["epochs"] == 7 and sasrec["train_seconds"] == 130.0
    assert sasrec["continued"]["resumed_after_epoch"] == 2
    assert sasrec["continued"]["first_run"]["stopped_by"] == "time_budget"
    assert json.loads((later / "fMRLRec-0.json").read_text()) == converged
    assert (first / "SASRec-1.json").is_file() and checkpoint.read_bytes() == b"weights"
    with pytest.raises(SystemExit):
        accuracy.main([*argv, f"--out={first}"])
    assert "--continue_from and --out must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--variants=SASRec", "--grid_points=0", f"--continue_from={first}", f"--out={later}"])
    assert "it has no SASRec-0.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the first run had RecBole's seed: another one would mix two seeds
        accuracy.main([*argv, f"--out={tmp_path / 'seeded'}", "--seed=3"])
    assert "SASRec point 1 was trained with no --seed; use it here too" in capsys.readouterr().err
    checkpoint.unlink()  # a missing checkpoint stops the command before anything trains
    with pytest.raises(SystemExit, match="its checkpoint .* is gone"):
        accuracy.main([*argv, f"--out={tmp_path / 'third'}"])
    assert len(asked) == 1


def test_accuracy_a_killed_point_continues_from_its_progress_record_even_twice(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    runs = [tmp_path / name for name in ("first", "second", "third")]

    def killed_after(history, epochs, best, seconds):
        """A child that validated ``history`` (up to epoch ``epochs``, best ``best``) and was then killed."""

        def run(spec, cwd=None):
            checkpoint = Path(spec["progress_file"]).parent / "saved" / f"at-{best}.pth"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_bytes(b"weights")
            record = {
                **spec, "valid_history": history, "epochs": epochs, "best_epoch": best,
                "stopped_by": "interrupted", "train_seconds": seconds, "wall_seconds": seconds + 1,
                "best_valid_score": max(history), "best_valid_result": {"ndcg@10": max(history)},
                "saved_model_file": str(checkpoint),
            }  # fmt: skip
            Path(spec["progress_file"]).write_text(json.dumps(record))
            asked.append(spec)
            return {"error": "Killed", "stderr": "Killed"}

        return run

    asked: list[dict] = []
    argv = ["--variants=SASRec", "--grid_points=1"]
    monkeypatch.setattr(benchmark, "run_in_subprocess", killed_after([0.1, 0.3, 0.2], 3, 1, 100.0))
    assert accuracy.main([*argv, f"--out={runs[0]}"]) == 1
    assert "is kept in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same --out would start it over and lose its three epochs
        accuracy.main([*argv, f"--out={runs[0]}"])
    assert "SASRec point 1 was interrupted after 3 epochs" in capsys.readouterr().err
    # Continued from epoch 1's checkpoint and killed again after two more epochs (a new best at epoch 3).
    monkeypatch.setattr(benchmark, "run_in_subprocess", killed_after([0.25, 0.4], 4, 3, 50.0))
    assert accuracy.main([*argv, f"--continue_from={runs[0]}", f"--out={runs[1]}"]) == 1
    assert Path(asked[-1]["resume_file"]).read_bytes() == b"weights"
    assert asked[-1]["continues"] == str((runs[0] / "SASRec-1.progress.json").resolve())

    def converges(spec, cwd=None):
        asked.append(spec)
        return {
            "valid_history": [0.38, 0.39], "epochs": 6, "best_epoch": 3, "stopped_by": "early_stopping",
            "train_seconds": 20.0, "wall_seconds": 21.0, "best_valid_score": 0.4, "best_valid_result": None,
            "test_result": {"ndcg@10": 0.02, "recall@10": 0.04}, "saved_model_file": spec["resume_file"],
        }  # fmt: skip

    monkeypatch.setattr(benchmark, "run_in_subprocess", converges)
    assert accuracy.main([*argv, f"--continue_from={runs[1]}", f"--out={runs[2]}"]) == 0
    record = json.loads((runs[2] / "SASRec-1.json").read_text())
    # Epochs 0-1 of the first run, 2-3 of the second, 4-5 of the third; the three runs' time adds up.
    assert record["valid_history"] == [0.1, 0.3, 0.25, 0.4, 0.38, 0.39] and record["best_epoch"] == 3
    assert record["train_seconds"] == 170.0 and record["best_valid_result"] == {"ndcg@10": 0.4}
    assert "progress_file" not in record and not (runs[2] / "SASRec-1.progress.json").exists()
    assert (runs[0] / "SASRec-1.progress.json").is_file() and (runs[1] / "SASRec-1.progress.json").is_file()


def test_a_continued_point_without_a_better_epoch_keeps_its_checkpoint_results():
    from benchmarks.accuracy import continued_result

    earlier = {
        "valid_history": [0.1, 0.3, 0.2], "best_epoch": 1, "train_seconds": 10.0, "wall_seconds": 11.0,
        "epochs": 3, "stopped_by": "time_budget", "config": {}, "best_valid_score": 0.3,
        "best_valid_result": {"ndcg@10": 0.3},
    }  # fmt: skip
    later = {
        "valid_history": [0.25, 0.28], "best_epoch": 3, "train_seconds": 5.0, "wall_seconds": 6.0,
        "best_valid_score": 0.3, "best_valid_result": None, "stopped_by": "early_stopping",
    }  # fmt: skip
    merged = continued_result(earlier, later)
    assert merged["best_epoch"] == 1 and merged["best_valid_result"] == {"ndcg@10": 0.3}
    assert merged["valid_history"] == [0.1, 0.3, 0.25, 0.28]


def test_a_continued_point_that_ties_its_best_names_the_later_epoch():
    from benchmarks.accuracy import continued_result

    earlier = {
        "valid_history": [0.1, 0.3, 0.2], "best_epoch": 1, "train_seconds": 10.0, "wall_seconds": 11.0,
        "epochs": 3, "stopped_by": "time_budget", "config": {},
    }  # fmt: skip
    later = {
        "valid_history": [0.3, 0.28], "train_seconds": 5.0, "wall_seconds": 6.0,
        "best_valid_result": {"ndcg@10": 0.3},
    }  # fmt: skip
    assert continued_result(earlier, later)["best_epoch"] == 2  # RecBole's resumed run saved the tie


def test_speed_benchmarks_time_steps_in_turn_and_pair_their_ratios():
    from benchmarks import run

    calls = []
    steps = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    times = run._interleaved_times(steps, rounds=3)
    # One warm-up call each, then the steps in turn, round after round.
    assert calls == ["fast", "slow"] * 4 and {name: len(t) for name, t in times.items()} == {
        "fast": 3,
        "slow": 3,
    }
    # The paired ratio is the median of the per-round ratios, not the ratio of the medians.
    paired = {"a": [2.0, 4.0, 10.0], "b": [1.0, 1.0, 10.0]}
    assert run._paired_ratio(paired, "a", "b") == 2.0
    assert run._interleaved_medians(steps, rounds=1).keys() == {"fast", "slow"}


def test_gemm_floor_has_the_logit_gemms_gradients_and_keeps_its_ones():
    import torch

    from benchmarks import run

    torch.manual_seed(0)
    q = torch.randn(5, 4, requires_grad=True)
    e = torch.randn(7, 4, requires_grad=True)
    loss = run._gemm_floor_loss(q, e, None, [4], None)
    (2.0 * loss).backward()  # a non-unit upstream gradient scales G
    ones = torch.ones(5, 7)
    torch.testing.assert_close(q.grad, 2.0 * ones @ e.detach())
    torch.testing.assert_close(e.grad, 2.0 * ones.T @ q.detach())
    for items_major in (False, True):  # the forward's output layout does not change the gradients
        q.grad = e.grad = None
        run._gemm_floor_loss(q, e, None, [4], None, items_major=items_major).backward()
        torch.testing.assert_close(q.grad, ones @ e.detach())
        torch.testing.assert_close(e.grad, ones.T @ q.detach())
    kept = run._floor_ones(5, 7, torch.float32)
    run._gemm_floor_loss(q, e, None, [4], None).backward()
    assert run._floor_ones(5, 7, torch.float32) is kept  # built once
    assert bool((kept == 1).all())  # never scaled in place


def test_nested_loss_takes_the_faster_layout_of_the_floor(monkeypatch):
    import functools
    import time
    from types import SimpleNamespace

    from benchmarks import run

    def fake_step(loss_fn):
        if isinstance(loss_fn, functools.partial):
            delay = 0.002 if loss_fn.keywords.get("items_major") else 0.05
        else:
            delay = {"_gemm_floor_loss": 0.05, "nested_cross_entropy": 0.01}.get(loss_fn.__name__, 0.02)
        return lambda: time.sleep(delay)

    monkeypatch.setattr(run, "_paper_step", fake_step)
    out = run.bench_nested_loss(SimpleNamespace(repeats=1, official_code=None))
    assert out["floor"] == "gemm_floor_items_major"
    assert out["fused_over_gemm_floor"] > 1 and out["paired"]["fused_over_gemm_floor"] > 1
    # the fused loss without item tiles is its own step (a wrapped loss here, timed at the default delay)
    assert "fused_no_item_tiles" in out["step_s"] and out["paired"]["no_item_tiles_over_fused"] > 1


def test_loss_alone_times_the_fused_loss_with_and_without_sub_rows_and_item_tiles(monkeypatch):
    from benchmarks import run
    from recbole_fmrl.model.layers import nested_loss

    seen = []
    forward_blocks = nested_loss._forward_blocks

    def recording(*args, **kwargs):
        seen.append((nested_loss.SUB_COLUMNS, nested_loss.ITEM_TILE))
        return forward_blocks(*args, **kwargs)

    monkeypatch.setattr(nested_loss, "_forward_blocks", recording)
    default = (nested_loss.SUB_COLUMNS, nested_loss.ITEM_TILE)
    steps = run._loss_alone_steps(16, [4, 8, 16], rows=10, n_items=30)
    assert set(steps) == {
        "fused",
        "fused_no_sub_rows",
        "fused_no_item_tiles",
        "gemm_floor",
        "gemm_floor_items_major",
    }
    for name, expected in (
        ("fused", default),
        ("fused_no_sub_rows", (0, default[1])),
        ("fused_no_item_tiles", (default[0], 0)),
    ):
        seen.clear()
        steps[name]()
        assert seen and set(seen) == {expected}, name
        assert (nested_loss.SUB_COLUMNS, nested_loss.ITEM_TILE) == default  # restored after the step
    steps["gemm_floor"]()


def test_compare_code_times_another_checkouts_fused_loss_in_the_same_run(tmp_path, monkeypatch, capsys):
    import functools
    import shutil
    import time
    from types import SimpleNamespace

    import torch

    from benchmarks import run
    from recbole_fmrl.model.layers import nested_loss

    other = tmp_path / "old"
    (other / "recbole_fmrl" / "model" / "layers").mkdir(parents=True)
    shutil.copy(nested_loss.__file__, other / "recbole_fmrl" / "model" / "layers" / "nested_loss.py")
    compared = run._compared_loss(str(other))
    assert compared is not nested_loss.nested_cross_entropy  # loaded from the other checkout
    assert run._compared_loss(None) is None
    query, items = torch.randn(6, 16), torch.randn(9, 16)
    targets, weights = torch.randint(0, 9, (6,)), torch.full((3,), 1 / 3)
    torch.testing.assert_close(
        compared(query, items, targets, [4, 8, 16], weights),
        nested_loss.nested_cross_entropy(query, items, targets, [4, 8, 16], weights),
    )
    steps = run._loss_alone_steps(16, [4, 8, 16], rows=10, n_items=30, compared=compared)
    assert "fused_compared" in steps
    steps["fused_compared"]()

    def fake_step(loss_fn):
        if isinstance(loss_fn, functools.partial):
            return lambda: time.sleep(0.002)
        return lambda: time.sleep(0.03 if loss_fn is compared else 0.01)

    monkeypatch.setattr(run, "_paper_step", fake_step)
    monkeypatch.setattr(run, "_compared_loss", lambda code: compared if code else None)
    out = run.bench_nested_loss(SimpleNamespace(repeats=1, official_code=None, compare_code=str(other)))
    assert out["paired"]["compared_over_fused"] > 1 and out["compared_over_gemm_floor"] > 1
    assert out["compared_code"] == str(other.resolve())
    # A folder that is not a checkout of this repo is refused before anything runs.
    assert run.main(["--only=nested_loss", f"--compare_code={tmp_path / 'nothing'}"]) == 2
    assert "--compare_code=" in capsys.readouterr().err


def test_compiled_softmax_times_aten_and_inductor_on_the_same_scores(monkeypatch):
    from types import SimpleNamespace

    import pytest
    import torch

    from benchmarks import run
    from recbole_fmrl.model.layers import nested_loss

    compiled = []

    def eager(fn, **kwargs):  # no C++ build in the unit tests: the eager function stands in for inductor's
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", eager)
    monkeypatch.setattr(nested_loss, "auto_chunk_size", lambda n_items, n_sizes: 6)
    monkeypatch.setattr(nested_loss, "SUB_ROWS", 2)
    out = run.bench_compiled_softmax(SimpleNamespace(repeats=1))
    assert compiled == [{"dynamic": False}] * 2
    assert set(out["ms"]) == set(out["paired"]) == set(out["compile_s"]) == {6, 2}
    assert all(set(ms) == {"aten_into_buffer", "inductor_into_buffer"} for ms in out["ms"].values())
    # A compiled kernel that computes something else is refused before anything is timed.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda scores, out: out.zero_())
    with pytest.raises(AssertionError):
        run._softmax_steps(3, 7)

    def no_compiler(scores, out):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: no_compiler)
    out = run.bench_compiled_softmax(SimpleNamespace(repeats=1))
    assert "C++ compiler" in out["unavailable"] and out["ms"] == {}


def test_a_point_continued_from_its_last_epoch_keeps_every_epoch_once():
    from benchmarks.accuracy import continued_result

    earlier = {
        "valid_history": [0.1, 0.3, 0.2, 0.25], "best_epoch": 1, "train_seconds": 10.0, "wall_seconds": 11.0,
        "epochs": 4, "stopped_by": "time_budget", "config": {}, "best_valid_score": 0.3,
        "best_valid_result": {"ndcg@10": 0.3},
    }  # fmt: skip
    later = {
        "valid_history": [0.35, 0.28], "best_epoch": 4, "train_seconds": 5.0, "wall_seconds": 6.0,
        "best_valid_score": 0.35, "best_valid_result": {"ndcg@10": 0.35}, "resumed_after_epoch": 3,
    }  # fmt: skip
    merged = continued_result(earlier, later)
    # Epochs 2 and 3 were not trained again: the history has every epoch once, in order.
    assert merged["valid_history"] == [0.1, 0.3, 0.2, 0.25, 0.35, 0.28] and merged["best_epoch"] == 4
    assert merged["continued"]["resumed_after_epoch"] == 3 and merged["train_seconds"] == 15.0


def test_accuracy_a_killed_point_with_its_last_epoch_saved_continues_from_that_epoch(tmp_path, monkeypatch):
    from benchmarks import accuracy

    runs = [tmp_path / name for name in ("first", "second", "third")]
    asked: list[dict] = []

    def killed_after(history, epochs, best, seconds):
        def run(spec, cwd=None):
            folder = Path(spec["progress_file"]).parent / "saved"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "run.pth").write_bytes(b"best")
            (folder / "run-last.pth").write_bytes(f"epoch {epochs - 1}".encode())
            record = {
                **spec, "valid_history": history, "epochs": epochs, "best_epoch": best,
                "stopped_by": "interrupted", "train_seconds": seconds, "wall_seconds": seconds + 1,
                "best_valid_score": 0.4, "best_valid_result": {"ndcg@10": 0.4},
                "saved_model_file": str(folder / "run.pth"), "last_checkpoint_file": str(folder / "run-last.pth"),
            }  # fmt: skip
            Path(spec["progress_file"]).write_text(json.dumps(record))
            asked.append(spec)
            return {"error": "Killed", "stderr": "Killed"}

        return run

    argv = ["--variants=SASRec", "--grid_points=1"]
    monkeypatch.setattr(benchmark, "run_in_subprocess", killed_after([0.1, 0.4, 0.2], 3, 1, 100.0))
    assert accuracy.main([*argv, f"--out={runs[0]}"]) == 1
    assert asked[-1]["config"]["save_last_checkpoint"] is True
    monkeypatch.setattr(benchmark, "run_in_subprocess", killed_after([0.3, 0.35], 5, 1, 50.0))
    assert accuracy.main([*argv, f"--continue_from={runs[0]}", f"--out={runs[1]}"]) == 1
    # From the last epoch (2), not the best (1); the best checkpoint is copied beside it, to be tested.
    resumed = Path(asked[-1]["resume_file"])
    assert resumed.name == "run-last.pth" and resumed.read_bytes() == b"epoch 2"
    assert (resumed.parent / "run.pth").read_bytes() == b"best" and asked[-1]["resumed_after_epoch"] == 2

    def converges(spec, cwd=None):
        asked.append(spec)
        return {
            "valid_history": [0.38], "epochs": 6, "best_epoch": 1, "stopped_by": "early_stopping",
            "train_seconds": 20.0, "wall_seconds": 21.0, "best_valid_score": 0.4, "best_valid_result": None,
            "test_result": {"ndcg@10": 0.02, "recall@10": 0.04}, "saved_model_file": spec["resume_file"],
        }  # fmt: skip

    monkeypatch.setattr(benchmark, "run_in_subprocess", converges)
    assert accuracy.main([*argv, f"--continue_from={runs[1]}", f"--out={runs[2]}"]) == 0
    assert Path(asked[-1]["resume_file"]).read_bytes() == b"epoch 4" and asked[-1]["resumed_after_epoch"] == 4
    record = json.loads((runs[2] / "SASRec-1.json").read_text())
    # Every epoch once: 0-2 of the first run, 3-4 of the second, 5 of the third; no time counted twice.
    assert record["valid_history"] == [0.1, 0.4, 0.2, 0.3, 0.35, 0.38] and record["best_epoch"] == 1
    assert record["train_seconds"] == 170.0 and record["best_valid_result"] == {"ndcg@10": 0.4}
