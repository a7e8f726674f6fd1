"""Export the size-D sub-model of a trained nested model as an ordinary model of hidden size D.

    python -m recbole_fmrl.cli.export --model_file=saved/fMRLRec-....pth --size=64 --output=fmrlrec-64.pth [--trust]

The output is in the portable format (no pickled objects), loads with ``load_data_and_model`` and is
evaluated by RecBole's plain Trainer like any checkpoint. ``--trust`` is needed to read a RecBole (pickled)
checkpoint; the output never replaces the input and is written atomically.
"""

from __future__ import annotations

import os
import sys
import time

from recbole_fmrl.cli import checkpoint_parser, cli_entry
from recbole_fmrl.errors import ConfigError


def _cli():
    cli = checkpoint_parser("python -m recbole_fmrl.cli.export", __doc__.splitlines()[0])
    cli.add_argument("--size", type=int, required=True)
    cli.add_argument("--output", required=True)
    return cli


def _main(argv: list[str]) -> int:
    args = _cli().parse_args(argv)  # no config overrides: the checkpoint's own config is used
    if os.path.realpath(args.output) == os.path.realpath(args.model_file):
        raise ConfigError(
            f"--output {args.output} is the input checkpoint: exporting would replace the trained model; "
            "choose another --output."
        )
    from recbole_fmrl.quick_start import load_data_and_model
    from recbole_fmrl.submodel.checkpoint import save_portable
    from recbole_fmrl.submodel.export import export_submodel

    config, model, *_ = load_data_and_model(args.model_file, trust=args.trust)
    start = time.perf_counter()
    sub = export_submodel(model, args.size)
    path = save_portable(args.output, config, sub, **model.submodel_config(args.size))
    n_full = sum(p.numel() for p in model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    print(
        f"exported {config['model']} size {args.size} ({n_sub:,} parameters, full model {n_full:,}) "
        f"to {path} in {time.perf_counter() - start:.2f}s"
    )
    return 0


main = cli_entry(_main)


if __name__ == "__main__":
    sys.exit(main())
