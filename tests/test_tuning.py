"""python -m recbole_fmrl.tuning: hyperopt (RecBole's HyperTuning) and Ray Tune, plugin and built-in models."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from recbole_fmrl import tuning

SMALL = {**FAST, "modalities": [], "use_id_embedding": True, "hidden_size": 16, "mrl_sizes": [8, 16]}


def _args(tmp_path, model: str, params: str, *extra: str) -> list[str]:
    params_file = tmp_path / f"{model}.hyper"
    params_file.write_text(params)
    fixed = SMALL if model == "fMRLRec" else FAST
    return [
        f"--model={model}",
        "--dataset=mm-sample",
        f"--params_file={params_file}",
        f"--output_file={tmp_path / 'result.json'}",
        f"--checkpoint_dir={tmp_path / 'saved'}",
        *(f"--{k}={v}" for k, v in fixed.items()),
        *extra,
    ]


def _best_is_a_tried_point(tmp_path, n_trials: int) -> dict:
    report = json.loads((tmp_path / "result.json").read_text())
    tried = [t["params"] for t in report["trials"]]
    assert len(tried) == n_trials and report["best_params"] in tried
    assert report["best_valid_score"] == max(t["best_valid_score"] for t in report["trials"])
    return report


def test_hyperopt_grid_for_fmrlrec_reports_every_size_and_tunes_a_chosen_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _args(tmp_path, "fMRLRec", "learning_rate choice [0.001,0.01]\n", "--tune_size=8")
    assert tuning.main(argv) == 0
    report = _best_is_a_tried_point(tmp_path, 2)
    assert report["tune_size"] == 8
    for trial in report["trials"]:
        assert set(trial["test_result_by_size"]) == {"8", "16"}
        # the trial selected and tested the size-8 sub-model: its test result is size 8's, not size 16's
        by_size, test = trial["test_result_by_size"], trial["test_result"]
        assert by_size["8"] != by_size["16"]
        assert test == pytest.approx(by_size["8"])
        # the trial's sizes on valid too, at the checkpoint whose size-8 valid score selected it
        assert trial["valid_result_by_size"]["8"] == pytest.approx(trial["best_valid_result"])


def test_hyperopt_for_a_builtin_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tuning.main(_args(tmp_path, "SASRec", "hidden_dropout_prob choice [0.2,0.5]\n")) == 0
    _best_is_a_tried_point(tmp_path, 2)


def test_ray_tune_local_one_cpu_per_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _args(
        tmp_path,
        "fMRLRec",
        "learning_rate choice [0.001,0.01]\n",
        "--tool=ray",
        "--cpus_per_trial=1",
        f"--ray_dir={tmp_path / 'ray'}",
    )
    assert tuning.main(argv) == 0
    report = _best_is_a_tried_point(tmp_path, 2)
    assert all(set(t["test_result_by_size"]) == {"8", "16"} for t in report["trials"])


@pytest.mark.parametrize(
    "params, extra, message",
    [
        ("learning_rate choice [0.1]\n", ["--tool=optuna"], "--tool='optuna' is not one of"),
        ("learning_rate choise [0.1]\n", [], "type 'choise' is not one of"),
        ("learning_rate choice __import__('os')\n", [], "are not a literal list"),
        ("learning_rate uniform 0.1\n", [], "uniform needs 2 numbers"),
        ("learning_rat choice [0.1]\n", [], "['learning_rat'] is not a config key of fMRLRec"),
        ("learning_rate\n", [], "is not 'name type values'"),
        ("\n", [], "has no parameter lines"),
        ("learning_rate choice [0.1]\n", ["--tune_size=12"], "eval_size=12 is not one of mrl_sizes"),
    ],
)
def test_bad_inputs_are_one_line(params, extra, message, tmp_path, capsys):
    assert tuning.main(_args(tmp_path, "fMRLRec", params, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "result.json").exists()


def test_missing_params_file_and_dead_ray_address(tmp_path, capsys):
    assert tuning.main(["--params_file=/no/such.hyper"]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = _args(
        tmp_path, "fMRLRec", "learning_rate choice [0.1]\n", "--tool=ray", "--ray_address=127.0.0.1:1"
    )
    assert tuning.main(argv) == 2
    assert "cannot reach the Ray cluster at --ray_address=127.0.0.1:1" in capsys.readouterr().err
