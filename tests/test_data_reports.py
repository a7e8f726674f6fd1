"""What RecBole drops or keeps silently is reported; config strings are read as literals, never run."""

import shutil
from pathlib import Path

import pytest
from recbole.data import create_dataset

from recbole_fmrl.config import Config, literal_value
from recbole_fmrl.data.atomic import check_atomic_file
from recbole_fmrl.errors import DataFileError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mm(tmp_path):
    shutil.copytree(REPO / "dataset_atomic" / "mm-sample", tmp_path / "mm-sample")
    return tmp_path


def test_recbole_filter_drops_are_logged_with_counts(mm, caplog):
    config = Config(
        "BPR",
        "mm-sample",
        config_dict={"data_path": str(mm), "state": "WARNING", "user_inter_num_interval": "[12,inf)"},
    )
    dataset = create_dataset(config)
    total = len((mm / "mm-sample" / "mm-sample.inter").read_text().splitlines()) - 1
    dropped = total - dataset.inter_num
    assert dropped > 0
    assert f"RecBole dropped {dropped} of {total} interactions (the k-core filter" in caplog.text


def test_duplicate_interactions_are_reported(mm, caplog):
    inter = mm / "mm-sample" / "mm-sample.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([*lines, lines[1], lines[2]]) + "\n")
    create_dataset(Config("BPR", "mm-sample", config_dict={"data_path": str(mm), "state": "WARNING"}))
    assert "interactions repeat an earlier (user, item) pair (2 are exact duplicate rows)" in caplog.text
    caplog.clear()
    config = {"data_path": str(mm), "state": "WARNING", "rm_dup_inter": "first"}
    create_dataset(Config("BPR", "mm-sample", config_dict=config))
    assert "duplicated user-item interactions" in caplog.text


@pytest.mark.parametrize(
    "text, value",
    [
        ("[8, 16]", [8, 16]),
        ("{'a': 1}", {"a": 1}),
        ("1e-3", 1e-3),
        ("true", True),
        ("None", None),
        ("__import__('os').system('echo hi')", "__import__('os').system('echo hi')"),
        ("open('x')", "open('x')"),
    ],
)
def test_config_strings_are_literals_or_stay_strings(text, value):
    assert literal_value(text) == value


def test_atomic_file_check_accepts_good_files_and_names_the_bad_line(tmp_path):
    good = tmp_path / "g.inter"
    good.write_text("user_id:token\titem_id:token\tscore:float_seq\nu\ti\t1 2.5\nu\tj\t\n")
    check_atomic_file(good, None, required=("user_id", "item_id"))
    bad = tmp_path / "b.inter"
    bad.write_text("user_id:token\titem_id:token\tscore:float_seq\nu\ti\t1 x\n")
    with pytest.raises(DataFileError, match=r"b.inter:2: column 'score' is float_seq but holds 'x'"):
        check_atomic_file(bad, None)
    with pytest.raises(DataFileError, match="header has no \\['rating'\\] column"):
        check_atomic_file(good, None, required=("rating",))
    short = tmp_path / "s.inter"
    short.write_text("user_id:token\titem_id:token\nu\n")
    with pytest.raises(DataFileError, match="s.inter:2: 1 fields where the header has 2"):
        check_atomic_file(short, None)
