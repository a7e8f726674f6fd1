"""Public Amazon 2014 review + metadata files -> RecBole atomic files (k-core filtered).

    python -m recbole_fmrl.data.amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz \\
        --out dataset_atomic [--name amazon-beauty] [--k-core 5]

Reviews are JSON lines (reviewerID, asin, overall, unixReviewTime). Metadata lines are Python literals
(single-quoted dicts), parsed with ``ast.literal_eval`` (never ``eval``). Writes ``<out>/<name>/<name>.inter``
(user_id, item_id, rating, timestamp) and ``.item`` (title, brand, categories, price, image URL).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class AmazonFormatError(ValueError):
    """A raw file is missing or a line cannot be parsed; the message names the file and line."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise AmazonFormatError(f"{path}: no such file (expected a .json or .json.gz Amazon 2014 file).")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


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
    price = record.get("price")
    return (
        _clean(record.get("title")),
        _clean(record.get("brand")),
        ", ".join(categories),
        "" if price in (None, "") else str(float(price)),
        _clean(record.get("imUrl")),
    )


def convert(reviews: Path, meta: Path, out: Path, name: str, k: int = 5) -> Path:
    rows = k_core(read_reviews(Path(reviews)), k)
    if not rows:
        raise AmazonFormatError(f"{reviews}: no interactions left after the {k}-core filter; lower --k-core.")
    records = read_meta(Path(meta))
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r[0], r[3]))
    with open(folder / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    items = sorted({r[1] for r in rows})
    with open(folder / f"{name}.item", "w", encoding="utf-8") as f:
        f.write(
            "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tprice:float\timage:token\n"
        )
        f.writelines("\t".join([i, *item_fields(records.get(i, {}))]) + "\n" for i in items)
    missing = sum(i not in records for i in items)
    print(
        f"{name}: {len({r[0] for r in rows})} users, {len(items)} items, {len(rows)} interactions "
        f"({k}-core); {missing} items without metadata -> {folder}"
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", required=True, type=Path)
    parser.add_argument("--meta", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", default="amazon-beauty")
    parser.add_argument("--k-core", dest="k_core", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        convert(args.reviews, args.meta, args.out, args.name, args.k_core)
    except AmazonFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
