"""Export the size-D sub-model of a trained nested model as an ordinary model of hidden size D.

    python -m recbole_fmrl.export --model_file=saved/fMRLRec-....pth --size=64 --output=fmrlrec-64.pth

The output is in the portable format (no pickled objects), loads with ``load_data_and_model`` and is
evaluated by RecBole's plain Trainer like any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

from recbole_fmrl.evaluation.checkpoint import save_portable
from recbole_fmrl.evaluation.export import export_submodel, submodel_config_updates
from recbole_fmrl.model.layers.matryoshka import MatryoshkaSizeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from recbole_fmrl.quick_start import load_data_and_model

    sys.argv = sys.argv[:1]  # RecBole's Config must not read our flags as config keys
    config, model, *_ = load_data_and_model(args.model_file)
    start = time.perf_counter()
    try:
        sub = export_submodel(model, args.size)
    except (MatryoshkaSizeError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = save_portable(args.output, config, sub, **submodel_config_updates(model.mrl_sizes, args.size))
    n_full = sum(p.numel() for p in model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    print(
        f"exported {config['model']} size {args.size} ({n_sub:,} parameters, full model {n_full:,}) "
        f"to {path} in {time.perf_counter() - start:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
