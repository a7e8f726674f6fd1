"""Encode and cache a dataset's item features; optionally export them as a RecBole atomic feature file.

    python -m recbole_fmrl.cli.features --dataset=amazon-beauty --data_path=../shared/datasets [--key=value ...]
    python -m recbole_fmrl.cli.features --dataset=mm-sample --modalities=text,image --export-atomic

Any other ``--key=value`` sets a config key (text_encoder, image_encoder, image_pretrained, ...).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from recbole.data import create_dataset
from recbole.utils import init_logger

from recbole_fmrl.cli import cli_entry, config_from_cli, parser
from recbole_fmrl.config import Config
from recbole_fmrl.data.atomic import check_atomic_files
from recbole_fmrl.data.features import as_list, feature_cache_dir, load_item_features
from recbole_fmrl.fileio import atomic_write_lines


def export_atomic(features: dict, dataset, out_dir: Path, name: str) -> Path:
    """Write ``<name>.itememb`` (iid:token, <modality>_emb:float_seq) for RecBole's ``preload_weight``.

    RecBole's convention: the embedding file has its own id field, aliased to the item id.
    """
    tokens = dataset.field2id_token[dataset.iid_field]
    path = out_dir / f"{name}.itememb"
    mods = list(features)

    def lines():
        yield "\t".join(["iid:token"] + [f"{m}_emb:float_seq" for m in mods]) + "\n"
        for i in range(1, len(tokens)):
            cols = [" ".join(f"{v:.6g}" for v in features[m][i].tolist()) for m in mods]
            yield "\t".join([str(tokens[i]), *cols]) + "\n"

    atomic_write_lines(path, lines())
    return path


def _preload_hint(modality: str) -> str:
    return (
        f"additional_feat_suffix: [itememb], load_col: {{itememb: [iid, {modality}_emb]}}, "
        f"alias_of_item_id: [iid], preload_weight: {{iid: {modality}_emb}}"
    )


def _cli():
    cli = parser("python -m recbole_fmrl.cli.features", __doc__.splitlines()[0])
    cli.add_argument("--dataset", "-d", default="mm-sample")
    cli.add_argument(
        "--export-atomic",
        dest="export_atomic",
        action="store_true",
        help="also write <dataset>.itememb for RecBole's preload_weight",
    )
    return cli


def _main(argv: list[str]) -> int:
    args, overrides = config_from_cli(argv, _cli())
    dataset_name = args.dataset
    config = Config(
        model="fMRLRec", dataset=dataset_name, config_dict={"state": "WARNING", **overrides}, cli_args=[]
    )
    check_atomic_files(config)
    init_logger(config)
    dataset = create_dataset(config)
    modalities = as_list(config["modalities"])
    start = time.perf_counter()
    features = load_item_features(config, dataset, modalities)
    print(f"{dataset_name}: {dataset.item_num - 1} items, {time.perf_counter() - start:.1f}s")
    for modality, matrix in features.items():
        norms = np.linalg.norm(matrix[1:].numpy(), axis=1)
        print(f"  {modality}: {tuple(matrix.shape)} (row 0 = padding), mean L2 norm {norms.mean():.3f}")
    print(f"  cache: {feature_cache_dir(config).resolve()}")
    if args.export_atomic:
        path = export_atomic(features, dataset, Path(config["data_path"]), dataset_name)
        print(f"  atomic features: {path}\n  use it in any RecBole model: {_preload_hint(list(features)[0])}")
    return 0


main = cli_entry(_main)


if __name__ == "__main__":
    sys.exit(main())
