"""Amazon 2014 files -> RecBole atomic files, from either of two sources.

- The public review + metadata files (``convert``): reviews are JSON lines (reviewerID, asin, overall,
  unixReviewTime); metadata lines are Python literals (single-quoted dicts), parsed with
  ``ast.literal_eval`` (never ``eval``). Writes ``.inter`` (user_id, item_id, rating, timestamp, k-core
  filtered) and ``.item`` (title, brand, categories, price, image URL).
- The joined 5-core files of ``../shared/datasets/amazon2014-5core/<set>/`` (``convert_joined``):
  ``interactions.tsv`` (user_id, item_id, [timestamp,] pos) and optional ``items.tsv``. This regenerates the
  project's ``amazon-beauty``/``-toys``/``-sports`` atomic files exactly.

Both write every file through a temp file renamed into place, after all input has been read: a bad input
never truncates an existing good file. The CLI is ``python -m recbole_fmrl.cli.amazon``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from recbole_fmrl.errors import DataFileError
from recbole_fmrl.fileio import atomic_write_lines

logger = logging.getLogger(__name__)


class AmazonFormatError(DataFileError):
    """A raw file is missing or a line cannot be parsed; the message names the file and line."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise AmazonFormatError(f"{path}: no such file (expected a .json or .json.gz Amazon 2014 file).")
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise AmazonFormatError(
            f"{path}: the compressed file is truncated or damaged after line {number} ({err}); download it again."
        ) from None
    except UnicodeDecodeError as err:
        raise AmazonFormatError(
            f"{path}:{number + 1}: bytes that are not UTF-8 (at byte {err.start}); the file is damaged or "
            "not an Amazon 2014 file."
        ) from None


def read_reviews(path: Path) -> list[tuple[str, str, float, int]]:
    """(user, item, rating, timestamp) per review line."""
    rows = []
    for number, line in _lines(path):
        try:
            r = json.loads(line)
            rows.append((r["reviewerID"], r["asin"], float(r.get("overall", 0.0)), int(r["unixReviewTime"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AmazonFormatError(
                f"{path}:{number}: not a review line ({err.__class__.__name__}: {err}); each line must be a JSON "
                "object with reviewerID, asin, unixReviewTime (and overall)."
            ) from None
    return rows


def read_meta(path: Path) -> dict[str, dict]:
    """asin -> metadata dict, each line a Python literal (the 2014 files are not strict JSON)."""
    meta = {}
    for number, line in _lines(path):
        try:
            record = ast.literal_eval(line)
            meta[record["asin"]] = record
        except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as err:
            raise AmazonFormatError(
                f"{path}:{number}: not a metadata line ({err.__class__.__name__}); each line must be a Python "
                "dict literal with an 'asin' key."
            ) from None
    return meta


def k_core(rows: list[tuple], k: int) -> list[tuple]:
    """Repeatedly drop users and items with fewer than ``k`` interactions (duplicates count once)."""
    rows = list({(u, i): (u, i, r, t) for u, i, r, t in sorted(rows, key=lambda x: x[3])}.values())
    while True:
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def _clean(text) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def item_fields(record: dict) -> tuple[str, str, str, str, str]:
    """(title, brand, categories, price, image URL) with tabs/newlines removed."""
    categories = []
    for path in record.get("categories") or []:
        for c in path if isinstance(path, list) else [path]:
            c = _clean(c)
            if c and c not in categories:
                categories.append(c)
    return (
        _clean(record.get("title")),
        _clean(record.get("brand")),
        ", ".join(categories),
        parse_price(record.get("price")),
        _clean(record.get("imUrl")),
    )


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_price(price) -> str:
    """A price as a float string, or "" when it has none: ``12.99``, ``'$12.99'``, ``'$1,299.00'`` all work;
    a range (``'$5 - $9'``) keeps its lower bound."""
    if price is None or isinstance(price, bool):
        return ""
    if isinstance(price, (int, float)):
        return str(float(price)) if price == price else ""
    match = _NUMBER.search(str(price).replace(",", ""))
    return str(float(match.group())) if match else ""


def _write(folder: Path, name: str, files: dict[str, list[str]]) -> None:
    """Every atomic file at once, each through temp + rename, after all input was read and built."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, lines in files.items():
        atomic_write_lines(folder / f"{name}.{suffix}", lines)


def convert(reviews: Path, meta: Path, out: Path, name: str, k: int = 5) -> Path:
    rows = k_core(read_reviews(Path(reviews)), k)
    if not rows:
        raise AmazonFormatError(f"{reviews}: no interactions left after the {k}-core filter; lower --k-core.")
    records = read_meta(Path(meta))
    folder = Path(out) / name
    rows.sort(key=lambda r: (r[0], r[3]))
    items = sorted({r[1] for r in rows})
    fields = {i: item_fields(records.get(i, {})) for i in items}
    unparsed = sum(1 for i in items if records.get(i, {}).get("price") not in (None, "") and not fields[i][3])
    if unparsed:
        logger.warning(f"{meta}: {unparsed} prices could not be read as numbers and were left empty")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n"]
    inter += [f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows]
    item = ["item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tprice:float\timage:token\n"]
    item += ["\t".join([i, *fields[i]]) + "\n" for i in items]
    _write(folder, name, {"inter": inter, "item": item})
    missing = sum(i not in records for i in items)
    print(
        f"{name}: {len({r[0] for r in rows})} users, {len(items)} items, {len(rows)} interactions "
        f"({k}-core); {missing} items without metadata -> {folder}"
    )
    return folder


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise AmazonFormatError(f"{path}: no such file (a joined Amazon 2014 folder holds interactions.tsv).")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise AmazonFormatError(f"{path}:1: header lacks {missing} (it has {reader.fieldnames}).")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if None in row or any(row[c] is None for c in required):
            raise AmazonFormatError(f"{path}:{number}: wrong number of tab-separated fields.")
    return rows


def _joined_categories(text: str, where: str) -> str:
    try:
        paths = json.loads(text) if text else []
    except json.JSONDecodeError:
        raise AmazonFormatError(f"{where}: categories is not a JSON list of category paths.") from None
    seen: list[str] = []
    for path in paths:
        for c in path if isinstance(path, list) else [path]:
            c = _clean(c)
            if c and c not in seen:
                seen.append(c)
    return ", ".join(seen)


def convert_joined(source: Path, out: Path, name: str) -> Path:
    """``interactions.tsv`` (+ ``items.tsv``) of a joined 5-core folder -> ``<out>/<name>/`` atomic files.

    Interactions keep the file's (chronological) order; ``timestamp`` = day timestamp + position in the
    user's sequence (the position alone where there is no timestamp), so ordering by time gives the
    published order. Items get title, the categories flattened in order, and ``brand_<id>`` from the
    anonymous brand attribute where the file has one.
    """
    source = Path(source)
    rows = _read_tsv(source / "interactions.tsv", ("user_id", "item_id", "pos"))
    timed = bool(rows) and "timestamp" in rows[0]
    inter = ["user_id:token\titem_id:token\ttimestamp:float\n"]
    for number, r in enumerate(rows, start=2):
        try:
            stamp = (int(r["timestamp"]) if timed else 0) + int(r["pos"])
        except ValueError:
            raise AmazonFormatError(
                f"{source / 'interactions.tsv'}:{number}: timestamp/pos are not integers."
            ) from None
        inter.append(f"{r['user_id']}\t{r['item_id']}\t{stamp}\n")
    files = {"inter": inter}
    items_path = source / "items.tsv"
    if items_path.is_file():
        items = _read_tsv(items_path, ("item_id", "title", "categories"))
        brand = bool(items) and "s3rec_brand_attr_id" in items[0]
        header = ["item_id:token", "title:token_seq", "categories:token_seq"] + (
            ["brand:token"] if brand else []
        )
        lines = ["\t".join(header) + "\n"]
        for number, r in enumerate(items, start=2):
            cells = [
                r["item_id"],
                _clean(r["title"]),
                _joined_categories(r["categories"], f"{items_path}:{number}"),
            ]
            if brand:
                cells.append(f"brand_{r['s3rec_brand_attr_id']}" if r["s3rec_brand_attr_id"] else "")
            lines.append("\t".join(cells) + "\n")
        files["item"] = lines
    folder = Path(out) / name
    _write(folder, name, files)
    print(
        f"{name}: {len(rows)} interactions{', ' + str(len(files['item']) - 1) + ' items' if 'item' in files else ''} -> {folder}"
    )
    return folder
