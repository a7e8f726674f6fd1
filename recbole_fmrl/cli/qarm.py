"""Compute a dataset's QARM item codes and write them as RecBole atomic token_seq fields.

    python -m recbole_fmrl.cli.qarm --dataset=amazon-beauty --data_path=../shared/datasets --out=DIR [--key=value ...]

Writes ``DIR/<dataset>/`` (the ``.inter`` and an ``.item`` with ``qarm_rq`` and ``qarm_vq`` token_seq fields) and
``DIR/<dataset>/qarm-report.json`` (pairs, alignment loss, neighbour agreement, codebook usage, collisions,
seconds, peak memory). Any RecBole model can then read the codes with ``--data_path=DIR``, e.g.
``--model=SASRecF --selected_features="['qarm_rq']"``. The alignment sees RecBole's training split only.
QARM keys (``qarm_rq_levels``, ``qarm_vq_k``, ...) are QARMRec's, from ``properties/model/fMRLRec.yaml``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from recbole_fmrl.cli import cli_entry, config_from_cli, parser
from recbole_fmrl.fileio import atomic_write_bytes


def _cli():
    cli = parser("python -m recbole_fmrl.cli.qarm", __doc__.splitlines()[0])
    cli.add_argument("--dataset", "-d", default="mm-sample")
    cli.add_argument(
        "--out", required=True, help="folder that receives <dataset>/ with the coded atomic files"
    )
    return cli


def _main(argv: list[str]) -> int:
    args, overrides = config_from_cli(argv, _cli())
    from recbole.data import create_dataset, data_preparation

    from recbole_fmrl.config import Config
    from recbole_fmrl.quantization.qarm import check_export_target, export_codes_atomic, item_codes

    overrides.setdefault("state", "WARNING")
    config = Config("QARMRec", args.dataset, config_dict=overrides, cli_args=[])
    check_export_target(config, args.out)  # before minutes of work, not after
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    start = time.perf_counter()
    codes = item_codes(config, train._dataset)
    report = {
        "dataset": args.dataset,
        "items": int(dataset.item_num - 1),
        "code_seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **codes.report,
    }
    folder = export_codes_atomic(config, dataset, codes, args.out)
    atomic_write_bytes(folder / "qarm-report.json", (json.dumps(report, indent=2) + "\n").encode())
    rq, vq = report.get("rq", {}), report.get("vq", {})
    print(
        f"QARM codes for {report['items']} items in {report['code_seconds']} s (peak RSS {report['peak_rss_mb']} MB)"
    )
    if "neighbour_agreement_raw" in report:
        print(
            f"  alignment: {report['u2i_pairs']} U2I + {report['i2i_pairs']} I2I pairs; nearest neighbour "
            f"co-interacted {report['neighbour_agreement_raw']:.3f} raw -> {report['neighbour_agreement_aligned']:.3f} aligned"
        )
    if rq:
        print(
            f"  RQ: {rq['levels']} levels x {rq['codebook_size']}, collision rate {rq['collision_rate']:.4f}, "
            f"usage {[round(u, 2) for u in rq['codebook_usage']]}"
        )
    if vq:
        print(f"  VQ: top-{vq['k']} neighbours, collision rate {vq['collision_rate']:.4f}")
    print(f"wrote {folder} (use --data_path={Path(args.out)})")
    return 0


main = cli_entry(_main)


if __name__ == "__main__":
    sys.exit(main())
