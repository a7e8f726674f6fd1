"""Re-evaluate a saved checkpoint at every Matryoshka size.

    python -m recbole_fmrl.cli.evaluate --model_file=saved/fMRLRec-....pth [--split=test|valid] [--out_dir=DIR] [--trust]

The report goes to ``<out_dir>/<checkpoint>-<split>-reeval-sizes.{csv,json,png}`` (default out_dir: the
checkpoint's folder), a name the training run's own report never has.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recbole_fmrl.cli import checkpoint_parser, cli_entry


def _cli():
    cli = checkpoint_parser("python -m recbole_fmrl.cli.evaluate", __doc__.splitlines()[0])
    cli.add_argument("--split", choices=("test", "valid"), default="test")
    cli.add_argument(
        "--out_dir", default=None, help="where the CSV/JSON/PNG go (default: beside the checkpoint)"
    )
    return cli


def _main(argv: list[str]) -> int:
    args = _cli().parse_args(argv)  # no config overrides: the checkpoint's own config is used
    from recbole_fmrl.evaluation import evaluate_all_sizes, format_table, size_costs, write_report
    from recbole_fmrl.quick_start import load_data_and_model
    from recbole_fmrl.utils import get_trainer

    config, model, _, train_data, valid_data, test_data = load_data_and_model(
        args.model_file, trust=args.trust
    )
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)
    data = test_data if args.split == "test" else valid_data
    by_size = evaluate_all_sizes(trainer, data)
    costs = size_costs(model, data, config["device"])
    print(format_table(by_size, costs))
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.model_file).resolve().parent
    stem = out_dir / f"{Path(args.model_file).stem}-{args.split}-reeval-sizes"
    files = write_report(by_size, costs, stem, config["dataset"], config["model"], args.split)
    print(f"written: {files['csv']}, {files['json']}, {files['png']}")
    return 0


main = cli_entry(_main)


if __name__ == "__main__":
    sys.exit(main())
