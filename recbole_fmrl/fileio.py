"""Every file the plugin writes (caches, checkpoints, reports, atomic files, downloads) lands through a temp
file beside it that is renamed into place only when complete: a crash or a bad input never leaves a
half-written file or truncates a good one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def atomic_write(path: str | os.PathLike, save: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``save(tmp)`` on a temp file beside ``path``, then rename it over ``path``.

    ``suffix`` ends the temp name, for writers that append their own extension otherwise (``np.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Text lines (each with its newline) to ``path``, atomically, as UTF-8 with ``\\n`` endings."""

    def save(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)

    return atomic_write(path, save)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
