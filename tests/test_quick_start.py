import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from recbole_fmrl.config import Config, DatasetNotFoundError
from recbole_fmrl.data import mm_sample
from recbole_fmrl.quick_start import main, run_recbole_fmrl
from recbole_fmrl.utils import UnknownModelError, get_model

REPO = Path(__file__).resolve().parents[1]


def test_builtin_sequential_model_trains_through_plugin_entry(in_tmp):
    result = run_recbole_fmrl("SASRec", "mm-sample", config_dict={**FAST, "checkpoint_dir": str(in_tmp)})
    assert set(result["test_result"]) >= {"recall@10", "ndcg@10", "mrr@10"}
    assert 0 <= result["test_result"]["ndcg@10"] <= 1


def test_get_model_falls_back_to_recbole():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert get_model("SASRec") is SASRec


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(UnknownModelError, match="SASRec") as err:
        get_model("SASRecc")
    assert "Did you mean SASRec" in str(err.value)


def test_plugin_yaml_loaded_and_user_values_win():
    config = Config("SASRec", "mm-sample", config_dict={"state": "WARNING"})
    assert config["MAX_ITEM_LIST_LENGTH"] == 20  # properties/dataset/mm-sample.yaml
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE loss: no negative sampling
    config = Config("SASRec", "mm-sample", config_dict={"state": "WARNING", "MAX_ITEM_LIST_LENGTH": 7})
    assert config["MAX_ITEM_LIST_LENGTH"] == 7


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--data_path") as err:
        Config("SASRec", "amazon-beauty", config_dict={"data_path": str(tmp_path)})
    assert str(tmp_path / "amazon-beauty") in str(err.value)


def test_cli_bad_inputs_exit_nonzero_with_one_message(capsys):
    assert main(["--model=NoSuchModel", "--dataset=mm-sample"]) == 2
    assert "Unknown model 'NoSuchModel'" in capsys.readouterr().err
    assert main(["--model=SASRec", "--dataset=no-such-set"]) == 2
    assert "Dataset 'no-such-set' not found" in capsys.readouterr().err


def test_cli_script_unknown_model_fails_with_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_fmrl.py"), "--model=NoSuchModel", "--dataset=ml-100k"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "recbole-fmrl models" in proc.stderr


def test_mm_sample_generator_is_deterministic_and_matches_shipped_copy(tmp_path):
    out = mm_sample.generate(tmp_path / "mm-sample")
    shipped = REPO / "dataset_atomic" / "mm-sample"
    for name in ("mm-sample.inter", "mm-sample.item", "images/i0001.png", "images/i0200.png"):
        assert filecmp.cmp(out / name, shipped / name, shallow=False), name
    lines = (out / "mm-sample.inter").read_text().splitlines()[1:]
    assert 3000 <= len(lines) <= 5000
    assert len({line.split("\t")[0] for line in lines}) == 300


def test_cpu_profile_applies_without_gpu_and_user_values_still_win():
    auto = Config("fMRLRec", "mm-sample", config_dict={"state": "WARNING", "use_gpu": False})
    assert auto["hidden_size"] == 256 and auto["mrl_sizes"][-1] == 256  # properties/profiles/fMRLRec-cpu.yaml
    assert auto["freeze_features"] is True and auto["use_id_embedding"] is True  # frozen text + ID
    assert auto["train_batch_size"] == 64
    paper = Config("fMRLRec", "mm-sample", config_dict={"state": "WARNING", "device_profile": "paper"})
    assert paper["hidden_size"] == 1024 and paper["learning_rate"] == 0.0001
    mine = Config(
        "fMRLRec", "mm-sample", config_dict={"state": "WARNING", "hidden_size": 64, "mrl_sizes": [32, 64]}
    )
    assert mine["hidden_size"] == 64


def test_qarm_cpu_profile_keeps_its_measured_tower_without_ids():
    """QARMRec inherits fMRLRec's CPU profile but not its ID embedding: its codes are the item tower."""
    auto = Config("QARMRec", "mm-sample", config_dict={"state": "WARNING", "use_gpu": False})
    assert auto["hidden_size"] == 256 and auto["freeze_features"] is True
    assert auto["use_id_embedding"] is False
    assert auto["train_batch_size"] == 256  # its measured batch, not fMRLRec's profile's 64


def test_resume_file_trains_on_from_a_checkpoint_and_refuses_the_wrong_ones(in_tmp):
    import shutil

    import torch

    from recbole_fmrl.errors import CheckpointError, ConfigError
    from recbole_fmrl.submodel.checkpoint import FORMAT

    config = {**FAST, "checkpoint_dir": str(in_tmp / "saved")}
    first = run_recbole_fmrl("BPR", "mm-sample", config_dict=config, cli_args=[])
    copy = in_tmp / "elsewhere.pth"  # not the file this process wrote: pickled, so it needs trust
    shutil.copyfile(first["saved_model_file"], copy)
    with pytest.raises(CheckpointError, match="--trust"):
        run_recbole_fmrl("BPR", "mm-sample", config_dict=config, cli_args=[], resume_file=str(copy))
    with pytest.raises(ConfigError, match="is a BPR checkpoint, not NeuMF: resume with --model=BPR"):
        run_recbole_fmrl(
            "NeuMF", "mm-sample", config_dict=config, cli_args=[], resume_file=str(copy), trust=True
        )
    exported = in_tmp / "exported.pth"  # a portable sub-model keeps no optimizer state
    torch.save(
        {"format": FORMAT, "model": "MRL4Rec", "dataset": "mm-sample", "config": {}, "state_dict": {}},
        exported,
    )
    with pytest.raises(ConfigError, match="exported sub-model, which keeps no optimizer state"):
        run_recbole_fmrl("MRL4Rec", "mm-sample", config_dict=config, cli_args=[], resume_file=str(exported))

    def resume(epochs: int) -> dict:
        extra = {**config, "epochs": epochs}
        return run_recbole_fmrl(
            "BPR", "mm-sample", config_dict=extra, cli_args=[], resume_file=str(copy), trust=True
        )

    later = resume(3)
    # Epoch 0 came from the checkpoint: epochs 1 and 2 are the ones trained now; the best model stays in that file.
    assert later["epochs"] == 3 and len(later["valid_history"]) == 2
    assert later["saved_model_file"] == str(copy)
    # Nothing left to train (its epochs are done): the checkpoint's valid results are still reported.
    done = resume(1)
    assert done["valid_history"] == [] and done["best_valid_result"]["ndcg@10"] >= 0


def test_a_last_epoch_checkpoint_resumes_where_training_stopped_and_tests_the_best_model(in_tmp):
    import shutil

    from recbole_fmrl.errors import ConfigError
    from recbole_fmrl.quick_start import last_checkpoint_file
    from recbole_fmrl.submodel.checkpoint import read_checkpoint

    config = {**FAST, "checkpoint_dir": str(in_tmp / "saved"), "epochs": 4, "save_last_checkpoint": True}
    first = run_recbole_fmrl("BPR", "mm-sample", config_dict=config, cli_args=[])
    best_file, last_file = first["saved_model_file"], first["last_checkpoint_file"]
    assert last_file == last_checkpoint_file(best_file) and last_file.endswith("-last.pth")
    last = read_checkpoint(last_file)[0]
    best = read_checkpoint(best_file)[0]
    # The last validated epoch with RecBole's early-stopping count after it; the best file has the best epoch.
    assert last["epoch"] == 3 and best["epoch"] == first["best_epoch"]
    assert (
        last["cur_step"] == 3 - first["best_epoch"] and last["best_valid_score"] == first["best_valid_score"]
    )
    best_bytes = open(best_file, "rb").read()

    later = run_recbole_fmrl(
        "BPR", "mm-sample", config_dict={**config, "epochs": 6}, cli_args=[], resume_file=last_file
    )
    # Epochs 4 and 5 are the ones trained now (from the last epoch, not again from the best one); the best
    # model found is saved over, and tested from, the best file, and the last file moves on.
    assert later["epochs"] == 6 and len(later["valid_history"]) == 2
    assert later["saved_model_file"] == best_file and later["last_checkpoint_file"] == last_file
    assert read_checkpoint(last_file)[0]["epoch"] == 5
    # The best score so far came with the checkpoint; no better (or tied) epoch leaves the best file alone.
    assert later["best_valid_score"] == max(first["best_valid_score"], *later["valid_history"])
    if max(later["valid_history"]) < first["best_valid_score"]:
        assert open(best_file, "rb").read() == best_bytes
    assert later["best_valid_result"]["ndcg@10"] >= 0 and later["test_result"]["ndcg@10"] >= 0

    alone = in_tmp / "alone"
    alone.mkdir()
    shutil.copyfile(last_file, alone / Path(last_file).name)
    with pytest.raises(
        ConfigError, match="the best model it goes with, .* is missing: put it back beside it"
    ):
        run_recbole_fmrl(
            "BPR", "mm-sample", config_dict=config, cli_args=[], resume_file=str(alone / Path(last_file).name),
            trust=True,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="save_last_checkpoint='yes' must be True or False"):
        run_recbole_fmrl(
            "BPR", "mm-sample", config_dict={**config, "save_last_checkpoint": "yes"}, cli_args=[]
        )
