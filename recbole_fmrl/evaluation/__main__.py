"""Re-evaluate a saved checkpoint at every Matryoshka size.

python -m recbole_fmrl.evaluation --model_file=saved/fMRLRec-....pth [--split=test|valid]
"""

from __future__ import annotations

import argparse
import sys

from recbole_fmrl.evaluation.matryoshka import evaluate_all_sizes, format_table, size_costs, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", required=True)
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--out_dir", default=None, help="where the CSV/JSON/PNG go (default: checkpoint_dir)")
    args = parser.parse_args(argv)

    from recbole_fmrl.evaluation.export import speaks_matryoshka
    from recbole_fmrl.quick_start import load_data_and_model
    from recbole_fmrl.utils import get_trainer

    sys.argv = sys.argv[:1]
    config, model, _, train_data, valid_data, test_data = load_data_and_model(args.model_file)
    if not speaks_matryoshka(model):
        print(
            f"error: {config['model']} is not a nested (Matryoshka) model; evaluate it with RecBole.",
            file=sys.stderr,
        )
        return 2
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)
    data = test_data if args.split == "test" else valid_data
    try:
        by_size = evaluate_all_sizes(trainer, data)
    except ValueError as error:  # sampled evaluation in the checkpoint's config
        print(f"error: {error}", file=sys.stderr)
        return 2
    costs = size_costs(model, data, config["device"])
    print(format_table(by_size, costs))
    files = write_report(
        by_size, costs, args.out_dir or config["checkpoint_dir"], config["dataset"], config["model"]
    )
    print(f"written: {files['csv']}, {files['json']}, {files['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
