"""Amazon 2014 files -> RecBole atomic files.

python -m recbole_fmrl.cli.amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out DIR [--name amazon-beauty] [--k-core 5]
python -m recbole_fmrl.cli.amazon --joined ../shared/datasets/amazon2014-5core/beauty --out DIR --name amazon-beauty
"""

from __future__ import annotations

import sys
from pathlib import Path

from recbole_fmrl.cli import cli_entry, parser
from recbole_fmrl.data.amazon import convert, convert_joined
from recbole_fmrl.errors import ConfigError


def _main(argv: list[str]) -> int:
    cli = parser("python -m recbole_fmrl.cli.amazon", __doc__.splitlines()[0])
    cli.add_argument("--reviews", type=Path, help="reviews_<Category>[_5].json[.gz]")
    cli.add_argument("--meta", type=Path, help="meta_<Category>.json[.gz]")
    cli.add_argument("--joined", type=Path, help="a folder with interactions.tsv [+ items.tsv]")
    cli.add_argument("--out", required=True, type=Path)
    cli.add_argument("--name", default="amazon-beauty")
    cli.add_argument("--k-core", dest="k_core", type=int, default=5)
    args = cli.parse_args(argv)
    if args.joined is not None:
        if args.reviews or args.meta:
            raise ConfigError("give either --joined or --reviews and --meta, not both.")
        convert_joined(args.joined, args.out, args.name)
    elif args.reviews and args.meta:
        convert(args.reviews, args.meta, args.out, args.name, args.k_core)
    else:
        raise ConfigError("give --joined FOLDER, or both --reviews FILE and --meta FILE.")
    return 0


main = cli_entry(_main)


if __name__ == "__main__":
    sys.exit(main())
