"""Where the plugin's yaml defaults and shipped datasets live, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def properties_dir() -> Path:
    """``properties/`` of a checkout, or the copy a wheel installs as ``recbole_fmrl/properties``."""
    for candidate in (PACKAGE_DIR / "properties", REPO_DIR / "properties"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"recbole_fmrl properties/ not found next to {PACKAGE_DIR}")


def dataset_dirs() -> list[Path]:
    """Folders searched for a dataset when no ``data_path`` is given: ./dataset_atomic, then the repo's."""
    seen, dirs = set(), []
    for candidate in (Path.cwd() / "dataset_atomic", REPO_DIR / "dataset_atomic"):
        resolved = candidate.resolve()
        if resolved not in seen:
            seen.add(resolved)
            dirs.append(resolved)
    return dirs
