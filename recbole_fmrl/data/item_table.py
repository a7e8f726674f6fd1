"""The ``.item`` table as feature input: rows aligned to RecBole's item ids, texts, gaps reported."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from recbole_fmrl.errors import FeatureError

logger = logging.getLogger(__name__)


UNTITLED = "Untitled item"
DEFAULT_TEXT_FIELDS = ("title", "categories", "brand", "price")


def read_item_table(data_dir: str | os.PathLike, dataset_name: str) -> pd.DataFrame:
    """The ``.item`` atomic file as strings, columns named without their ``:type`` suffix."""
    path = Path(data_dir) / f"{dataset_name}.item"
    if not path.is_file():
        raise FeatureError(
            f"No item file {path}: text/image features need '{dataset_name}.item' with item fields."
        )
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3, engine="python")
    table.columns = [c.split(":")[0] for c in table.columns]
    return table


def aligned_rows(
    table: pd.DataFrame,
    item_tokens: Sequence[str],
    id_field: str,
    strict: bool = False,
    source: str = ".item",
) -> list[int | None]:
    """For each internal item id (token order), its row in ``table`` or None; duplicates and gaps reported."""
    row_of: dict[str, int] = {}
    for i, tok in enumerate(table[id_field]):
        row_of.setdefault(tok, i)
    repeated = len(table) - len(row_of)
    if repeated:
        logger.warning(f"{source}: {repeated} rows repeat an item id; the first row of each id is used.")
    rows = [row_of.get(tok) for tok in item_tokens]
    report_coverage(sum(r is None for r in rows), len(rows), source, strict)
    return rows


def report_coverage(n_missing: int, n_items: int, source: str, strict: bool) -> None:
    """Warn (or, with ``strict_features``, fail) when some items have no feature input."""
    if not n_missing:
        return
    message = f"{source}: {n_missing} of {n_items} items have no row"
    if strict:
        raise FeatureError(
            f"{message} and strict_features is True: add the rows, or set strict_features=False."
        )
    logger.warning(
        f"{message}; they get a placeholder (zero vector or 'Untitled item'). strict_features=True makes this an error."
    )


def item_texts(table: pd.DataFrame, rows: Sequence[int | None], fields: Sequence[str]) -> list[str]:
    """ "Field: value" lines of each item's present fields; ``UNTITLED`` when it has none."""
    unknown = [f for f in fields if f not in table.columns]
    if unknown:
        raise FeatureError(
            f"text_fields {unknown} not in the item file (it has {list(table.columns)}): fix text_fields."
        )
    texts = []
    for r in rows:
        lines = []
        if r is not None:
            for f in fields:
                value = str(table.at[r, f]).strip()
                if value:
                    lines.append(f"{f.replace('_', ' ').capitalize()}: {value}")
        texts.append("\n".join(lines) if lines else UNTITLED)
    return texts
