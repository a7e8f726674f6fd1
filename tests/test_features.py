"""Multimodal feature loader, its cache and CLI, and the Amazon converter."""

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import create_dataset

from recbole_fmrl.cli import amazon as amazon_cli
from recbole_fmrl.cli import features as features_cli
from recbole_fmrl.config import Config
from recbole_fmrl.data import amazon, features, image_encoder, item_table, text_encoder
from recbole_fmrl.data.features import FeatureError, cached_encode, check_features, encode_modality

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small randomly initialised open_clip model config, registered like a user's own config file."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny-test-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "tiny-test-vit"


@pytest.fixture
def mm_copy(tmp_path):
    """A private copy of mm-sample, so tests may break or extend it."""
    shutil.copytree(REPO / "dataset_atomic" / "mm-sample", tmp_path / "data" / "mm-sample")
    return tmp_path


def setup(tmp_path, **extra):
    config = Config(
        "fMRLRec",
        "mm-sample",
        config_dict={
            "state": "WARNING",
            "data_path": str(tmp_path / "data"),
            "feature_cache_dir": str(tmp_path / "cache"),
            **extra,
        },
    )
    return config, create_dataset(config)


def cosine_by_category(matrix, dataset, data_dir):
    table = item_table.read_item_table(data_dir, "mm-sample")
    cat = dict(zip(table["item_id"], table["categories"], strict=True))
    tokens = dataset.field2id_token["item_id"][1:]
    labels = np.array([cat[t] for t in tokens])
    x = matrix[1:] / np.linalg.norm(matrix[1:], axis=1, keepdims=True)
    sim = x @ x.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    diff = labels[:, None] != labels[None, :]
    return sim[same].mean(), sim[diff].mean()


def test_minilm_text_features_align_and_carry_meaning(mm_copy):
    config, dataset = setup(mm_copy)
    matrix = encode_modality(config, dataset, "text")
    assert matrix.shape == (dataset.item_num, 384) and matrix.dtype == np.float32
    assert not matrix[0].any()  # padding row
    np.testing.assert_allclose(np.linalg.norm(matrix[1:], axis=1), 1.0, atol=1e-5)
    same, diff = cosine_by_category(matrix, dataset, mm_copy / "data" / "mm-sample")
    assert same > diff + 0.1
    encode = features.text_encoder_fn(features.default_text_encoder(), "mean", torch.device("cpu"))
    a, b, c = encode(
        ["Title: Shampoo for dry hair", "Title: Conditioner for dry hair", "Title: Cordless drill"]
    )
    assert a @ b > a @ c + 0.2


def test_open_clip_image_features_through_a_small_random_model(mm_copy, tiny_clip):
    config, dataset = setup(mm_copy, image_encoder=tiny_clip, image_pretrained="none")
    matrix = encode_modality(config, dataset, "image")
    assert matrix.shape == (dataset.item_num, 32)
    np.testing.assert_allclose(np.linalg.norm(matrix[1:], axis=1), 1.0, atol=1e-5)
    same, diff = cosine_by_category(matrix, dataset, mm_copy / "data" / "mm-sample")
    assert same > diff  # colour and shape follow the category, even through random weights


def test_cache_hit_skips_the_encoder_and_changed_input_reencodes(mm_copy, monkeypatch):
    config, dataset = setup(mm_copy)
    first = encode_modality(config, dataset, "text")

    def no_encoder(*_a, **_k):
        raise AssertionError("encoder loaded on a cache hit")

    monkeypatch.setattr(features, "text_encoder_fn", no_encoder)
    np.testing.assert_array_equal(encode_modality(config, dataset, "text"), first)
    config["text_fields"] = ["title"]  # other inputs -> other key -> encodes again
    with pytest.raises(AssertionError, match="cache hit"):
        encode_modality(config, dataset, "text")


def test_interrupted_encoding_resumes_from_saved_chunks(tmp_path):
    calls = []

    def flaky(batch):
        calls.append(list(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.array([[float(x)] for x in batch])

    inputs = list(range(10))
    ids = [f"i{x}" for x in inputs]
    with pytest.raises(KeyboardInterrupt):
        cached_encode(tmp_path / "f.npz", ids, inputs, flaky, chunk_size=4, desc="test")
    assert (tmp_path / "f.partial-c4" / "00000000-00000004.npy").is_file() and not (
        tmp_path / "f.npz"
    ).exists()
    calls.clear()
    out = cached_encode(
        tmp_path / "f.npz", ids, inputs, lambda b: np.array([[float(x)] for x in b]), 4, "test"
    )
    np.testing.assert_array_equal(out[:, 0], inputs)
    assert len(calls) == 0 or calls[0] != [0, 1, 2, 3]  # the first chunk was not encoded again
    assert not (tmp_path / "f.partial-c4").exists()


def test_missing_or_empty_text_fields_become_untitled(mm_copy):
    table = item_table.read_item_table(mm_copy / "data" / "mm-sample", "mm-sample")
    table.loc[0, ["title", "categories", "brand", "price"]] = ""
    texts = item_table.item_texts(table, [0, 1, None], ["title", "brand"])
    assert texts[0] == item_table.UNTITLED and texts[2] == item_table.UNTITLED
    assert texts[1].startswith("Title: ") and "\nBrand: " in texts[1]
    with pytest.raises(FeatureError, match=r"text_fields \['colour'\] not in the item file"):
        item_table.item_texts(table, [0], ["title", "colour"])


def test_text_encoder_not_available_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatureError, match="not available offline.*local folder"):
        text_encoder.load_text_encoder("no-such-org/no-such-model")


@pytest.mark.parametrize("policy", ["zero", "error"])
def test_missing_and_corrupt_images_follow_the_policy(mm_copy, tiny_clip, policy, caplog):
    images = mm_copy / "data" / "mm-sample" / "images"
    (images / "i0003.png").unlink()
    (images / "i0007.png").write_bytes(b"not a png at all")
    config, dataset = setup(
        mm_copy, image_encoder=tiny_clip, image_pretrained="none", image_missing=policy, feature_chunk_size=64
    )
    if policy == "error":
        with pytest.raises(FeatureError, match="cannot be read.*image_missing=zero"):
            encode_modality(config, dataset, "image")
        assert list((mm_copy / "cache").rglob("*.partial-c64"))  # chunks done before the bad image are kept
        return
    matrix = encode_modality(config, dataset, "image")
    rows = [dataset.token2id("item_id", t) for t in ("i0003", "i0007")]
    assert (
        not matrix[rows].any() and np.abs(matrix).sum(axis=1)[1:].astype(bool).sum() == dataset.item_num - 3
    )
    assert "2 items had no readable image" in caplog.text


def test_unreachable_image_url_counts_as_missing(tmp_path):
    assert (
        image_encoder.resolve_image("http://127.0.0.1:9/x.png", tmp_path, tmp_path / "dl", timeout=2) is None
    )


def test_nan_or_wrong_shape_features_are_rejected():
    bad = np.ones((5, 3), dtype=np.float32)
    bad[2, 1] = np.inf
    with pytest.raises(FeatureError, match="NaN/Inf"):
        check_features(bad, 5, "x.npy")
    with pytest.raises(FeatureError, match="expected \\(6, dim\\)"):
        check_features(np.ones((5, 3)), 6, "x.npy")


def test_features_cli_encodes_and_exports_atomic_file(mm_copy, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["features"])
    code = features_cli.main(
        [
            f"--data_path={mm_copy / 'data'}",
            "--dataset=mm-sample",
            "--modalities=text",
            f"--feature_cache_dir={mm_copy / 'cache'}",
            "--export-atomic",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "text: (201, 384)" in out
    atomic = mm_copy / "data" / "mm-sample" / "mm-sample.itememb"
    header, first = atomic.read_text().splitlines()[:2]
    assert header == "iid:token\ttext_emb:float_seq" and len(first.split("\t")[1].split()) == 384
    # Any RecBole model can now preload it.
    config = Config(
        "BPR",
        "mm-sample",
        config_dict={
            "state": "WARNING",
            "data_path": str(mm_copy / "data"),
            "additional_feat_suffix": ["itememb"],
            "load_col": {"inter": ["user_id", "item_id"], "itememb": ["iid", "text_emb"]},
            "alias_of_item_id": ["iid"],
            "preload_weight": {"iid": "text_emb"},
        },
    )
    dataset = create_dataset(config)
    weight = dataset.get_preload_weight("iid")
    assert weight.shape == (201, 384)
    config["feature_cache_dir"] = str(mm_copy / "cache")
    encoded = features.encode_modality(config, dataset, "text")
    np.testing.assert_allclose(weight, encoded, atol=1e-5)  # same rows, same order as our loader's


def _write_amazon(tmp_path, bad_line=False):
    reviews = tmp_path / "reviews_Toy_5.json.gz"
    rows = [
        {
            "reviewerID": f"U{u}",
            "asin": f"A{(u + k) % 6}",
            "overall": 4.0,
            "unixReviewTime": 1000 + 10 * k + u,
        }
        for u in range(7)
        for k in range(5)
    ]
    rows.append({"reviewerID": "lonely", "asin": "A0", "overall": 5.0, "unixReviewTime": 1})
    with gzip.open(reviews, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        if bad_line:
            f.write("{not json\n")
    meta = tmp_path / "meta_Toy.json.gz"
    with gzip.open(meta, "wt") as f:
        for i in range(6):
            f.write(
                repr(
                    {
                        "asin": f"A{i}",
                        "title": f"Toy's\tnumber {i}",
                        "brand": "Acme",
                        "categories": [["Toys", "Blocks"], ["Toys", "Kids"]],
                        "price": 9.5,
                        "imUrl": f"http://img/{i}.jpg",
                    }
                )
                + "\n"
            )
    return reviews, meta


def test_amazon_converter_writes_atomic_files_recbole_loads(tmp_path, in_tmp):
    reviews, meta = _write_amazon(tmp_path)
    folder = amazon.convert(reviews, meta, tmp_path / "out", "amazon-toy", k=5)
    inter = (folder / "amazon-toy.inter").read_text().splitlines()
    assert len(inter) == 1 + 35 and not any(line.startswith("lonely") for line in inter)  # k-core drops it
    item = (folder / "amazon-toy.item").read_text().splitlines()
    assert item[1].split("\t") == [
        "A0",
        "Toy's number 0",
        "Acme",
        "Toys, Blocks, Kids",
        "9.5",
        "http://img/0.jpg",
    ]
    config = Config("BPR", "amazon-toy", config_dict={"state": "WARNING", "data_path": str(tmp_path / "out")})
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (7, 6, 35)


def test_amazon_converter_names_the_bad_line(tmp_path, capsys):
    reviews, meta = _write_amazon(tmp_path, bad_line=True)
    code = amazon_cli.main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o")])
    assert code == 2 and f"{reviews}:37: not a review line" in capsys.readouterr().err
    assert amazon_cli.main(["--reviews", str(tmp_path / "nope.json"), "--meta", str(meta), "--out", "o"]) == 2


def test_resume_with_another_chunk_size_never_mixes_chunks(tmp_path):
    """The failure seen in the field: interrupt at one chunk size, resume at another -> wrong row count."""
    inputs = list(range(23))
    ids = [f"i{x}" for x in inputs]

    def interrupt_after_two(batch, calls=[]):  # noqa: B006  (counts calls across invocations)
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return np.array([[float(x), 1.0] for x in batch])

    with pytest.raises(KeyboardInterrupt):
        cached_encode(tmp_path / "f.npz", ids, inputs, interrupt_after_two, chunk_size=5, desc="t")
    out = cached_encode(
        tmp_path / "f.npz", ids, inputs, lambda b: np.array([[float(x), 1.0] for x in b]), 7, "t"
    )
    assert out.shape == (23, 2)
    np.testing.assert_array_equal(out[:, 0], inputs)


def test_bad_chunk_and_bad_cache_are_detected_and_rebuilt(tmp_path, caplog):
    inputs, ids = list(range(6)), [f"i{x}" for x in range(6)]
    encode = lambda b: np.array([[float(x)] for x in b])  # noqa: E731
    partial = tmp_path / "f.partial-c4"
    partial.mkdir()
    np.save(partial / "00000000-00000004.npy", np.full((3, 1), np.nan, dtype=np.float32))  # wrong rows, NaN
    out = cached_encode(tmp_path / "f.npz", ids, inputs, encode, 4, "t")
    np.testing.assert_array_equal(out[:, 0], inputs)
    assert "is invalid; encoding it again" in caplog.text
    # A cache of other item ids (the dataset changed under it) is not trusted either.
    caplog.clear()
    other = cached_encode(tmp_path / "f.npz", ["j0", *ids[1:]], inputs, encode, 4, "t")
    assert f"feature cache {tmp_path / 'f.npz'} is invalid (other item ids)" in caplog.text
    np.testing.assert_array_equal(other[:, 0], inputs)


def test_random_image_encoder_is_seeded_and_the_seed_is_in_the_cache_key(mm_copy, tiny_clip):
    extra = {"image_encoder": tiny_clip, "image_pretrained": "none", "feature_chunk_size": 256}
    config, dataset = setup(mm_copy, **extra)
    torch.manual_seed(1)
    first = encode_modality(config, dataset, "image")
    shutil.rmtree(mm_copy / "cache")
    torch.manual_seed(2)  # whatever the global RNG holds, the encoder is the same
    np.testing.assert_array_equal(encode_modality(config, dataset, "image"), first)
    config["feature_seed"] = 7
    other = encode_modality(config, dataset, "image")
    assert not np.allclose(other, first)
    assert len(list((mm_copy / "cache" / "mm-sample").glob("image-*.npz"))) == 2


def test_partial_precomputed_coverage_warns_or_fails_when_strict(mm_copy, caplog):
    config, dataset = setup(mm_copy)
    ids = list(dataset.field2id_token["item_id"][1:])
    np.save(mm_copy / "x.npy", np.ones((50, 4), dtype=np.float32))
    (mm_copy / "ids.txt").write_text("\n".join(ids[:50] + ["not-an-item"]) + "\n")
    np.save(mm_copy / "x.npy", np.ones((51, 4), dtype=np.float32))
    matrix = features.load_precomputed(mm_copy / "x.npy", mm_copy / "ids.txt", dataset)
    assert "150 of 200 items have no row" in caplog.text and "1 item ids are not items" in caplog.text
    assert (matrix[1:].any(axis=1)).sum() == 50
    with pytest.raises(FeatureError, match="strict_features is True"):
        features.load_precomputed(mm_copy / "x.npy", mm_copy / "ids.txt", dataset, strict=True)


def test_items_missing_from_the_item_file_are_counted(mm_copy, caplog):
    item_file = mm_copy / "data" / "mm-sample" / "mm-sample.item"
    lines = item_file.read_text().splitlines()
    item_file.write_text("\n".join([lines[0], *lines[3:], lines[5]]) + "\n")  # 2 items gone, 1 repeated
    config, dataset = setup(mm_copy)  # RecBole drops the interactions of items its .item lacks: reported
    assert "RecBole dropped" in caplog.text and "see filter_inter_by_user_or_item" in caplog.text
    table = item_table.read_item_table(item_file.parent, "mm-sample")
    tokens = [*dataset.field2id_token["item_id"][1:], "ghost"]
    item_table.aligned_rows(table, tokens, "item_id", False, str(item_file))
    assert "1 rows repeat an item id" in caplog.text and "1 of 199 items have no row" in caplog.text
    with pytest.raises(FeatureError, match="strict_features is True"):
        item_table.aligned_rows(table, tokens, "item_id", True, str(item_file))
