"""Command-line entry points (``python -m recbole_fmrl.cli.<name>``) and what they share.

Every CLI reads RecBole-style ``--key=value`` config overrides from the argv it is given (never from
``sys.argv`` behind its back), prints a bad input as one ``error: ...`` line and exits 2; ``--debug`` (or
``RECBOLE_FMRL_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from recbole_fmrl.errors import ConfigError, RecboleFmrlError

EXIT_USAGE = 2
DEBUG_ENV = "RECBOLE_FMRL_DEBUG"


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``RecboleFmrlError`` becomes one ``error: ...`` line on stderr and exit 2.

    ``--debug`` is removed from ``argv`` and lets the exception (with its traceback) through.
    """
    from recbole_fmrl.compat import UntrustedFileError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except (RecboleFmrlError, UntrustedFileError) as err:
        if debug:
            raise
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def cli_entry(main: Callable[[list[str]], int]) -> Callable[[Sequence[str] | None], int]:
    """``main(argv)`` wrapped by ``run_cli``: the entry point a ``python -m`` module exposes."""

    def entry(argv: Sequence[str] | None = None) -> int:
        return run_cli(main, argv)

    entry.__doc__ = main.__doc__
    return entry


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + exit, as one line and our exit code
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose errors are one line and exit 2, like every other bad input."""
    return _Parser(prog=prog, description=description)


def checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for a CLI that reads one checkpoint: ``--model_file`` and ``--trust``."""
    cli = parser(prog, description)
    cli.add_argument(
        "--model_file", required=True, help="a RecBole checkpoint or an exported (portable) file"
    )
    cli.add_argument("--trust", action="store_true", help="allow reading a RecBole (pickled) checkpoint")
    return cli


def config_from_cli(argv: Sequence[str], cli: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict]:
    """(the CLI's own flags, ``{key: value}`` of every other ``--key=value``) from ``argv``.

    The values stay strings; the plugin's Config reads them as literals (never ``eval``).
    """
    args, rest = cli.parse_known_args(list(argv))
    overrides = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            raise ConfigError(
                f"unrecognised argument {arg!r}: config overrides are written --key=value (see --help)."
            )
        overrides[key] = value
    return args, overrides
