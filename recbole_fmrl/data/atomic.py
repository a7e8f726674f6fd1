"""RecBole atomic files: checked before RecBole reads them, and every row RecBole drops is reported.

RecBole's reader turns a malformed file into a pandas traceback with no line number, and its filters drop
interactions without a word. ``check_atomic_files`` names the file, line and fix instead; the filter report
logs a warning with counts for every drop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recbole_fmrl.errors import DataFileError

logger = logging.getLogger(__name__)
FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
_SUFFIXES = ("inter", "user", "item")


def _files_to_check(config) -> list[tuple[Path, list[str] | None]]:
    """(file, columns RecBole will load or None for all) for each atomic file this config reads."""
    folder = Path(config["data_path"])
    load_col = config["load_col"]
    suffixes = list(_SUFFIXES) + list(config["additional_feat_suffix"] or [])
    out = []
    for suffix in suffixes:
        path = folder / f"{config['dataset']}.{suffix}"
        if not path.is_file():
            continue
        if isinstance(load_col, dict):
            if suffix not in load_col:
                continue
            out.append((path, list(load_col[suffix])))
        else:
            out.append((path, None))
    return out


def _parse_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_atomic_file(
    path: Path,
    columns: list[str] | None,
    sep: str = "\t",
    seq_sep: str = " ",
    encoding: str = "utf-8",
    required: tuple[str, ...] = (),
) -> None:
    """Raise ``DataFileError`` naming the line when ``path`` is not a well-formed atomic file."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataFileError(
            f"{path} is empty: an atomic file needs a header line such as 'user_id:token{sep}item_id:token' "
            "and one row per line; regenerate or restore it."
        )
    lines = raw.split(b"\n")
    decoded = []
    for number, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode(encoding).rstrip("\r"))
        except UnicodeDecodeError as err:
            raise DataFileError(
                f"{path}:{number}: bytes that are not {encoding} (at byte {err.start} of the line): re-save "
                f"the file as {encoding}, or set encoding to the file's encoding."
            ) from None
    header = decoded[0].split(sep)
    fields = []
    for column in header:
        name, _, kind = column.partition(":")
        if kind not in FIELD_TYPES:
            raise DataFileError(
                f"{path}:1: header column {column!r} has type {kind or '(none)'!r}: write it as name:type with "
                f"type one of {', '.join(FIELD_TYPES)}."
            )
        fields.append((name, kind))
    names = [name for name, _ in fields]
    absent = [name for name in required if name not in names]
    if absent:
        raise DataFileError(
            f"{path}:1: the header has no {absent} column (it has {names}): the model needs it; rename the "
            "column or set USER_ID_FIELD / ITEM_ID_FIELD."
        )
    wanted = set(columns) if columns is not None else set(names)  # RecBole skips load_col names it lacks
    numeric = [
        (i, name, kind)
        for i, (name, kind) in enumerate(fields)
        if name in wanted and kind.startswith("float")
    ]
    for number, line in enumerate(decoded[1:], start=2):
        if not line.strip():
            continue
        values = line.split(sep)
        if len(values) != len(fields):
            raise DataFileError(
                f"{path}:{number}: {len(values)} fields where the header has {len(fields)}: a field holds the "
                "separator (a tab) or one is missing; fix that row."
            )
        for i, name, kind in numeric:
            value = values[i].strip()
            parts = value.split(seq_sep) if kind == "float_seq" else [value]
            bad = next((p for p in parts if p and not _parse_float(p)), None)
            if bad is not None:
                raise DataFileError(
                    f"{path}:{number}: column '{name}' is {kind} but holds {bad[:40]!r}: fix the value, or "
                    f"declare the column as token in the header."
                )


def check_atomic_files(config) -> None:
    """Check every atomic file RecBole will load for this config (header types, encoding, rows, numbers)."""
    for path, columns in _files_to_check(config):
        ids = {"inter": (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"])}.get(path.suffix[1:], ())
        check_atomic_file(
            path,
            columns,
            sep=config["field_separator"] or "\t",
            seq_sep=config["seq_separator"] or " ",
            encoding=config["encoding"] or "utf-8",
            required=tuple(i for i in ids if i),
        )


# ----------------------------------------------------------------------------------------- filter report
_STEPS = (
    ("_filter_nan_user_or_item", "rows with a missing user or item id", "fill in the ids"),
    ("_remove_duplication", "duplicated user-item interactions", "rm_dup_inter"),
    ("_filter_by_field_value", "the value filter", "val_interval"),
    (
        "_filter_inter_by_user_or_item",
        "interactions of users/items absent from .user/.item",
        "filter_inter_by_user_or_item",
    ),
    ("_filter_by_inter_num", "the k-core filter", "user_inter_num_interval / item_inter_num_interval"),
)


def _count(frame) -> int:
    return 0 if frame is None else len(frame)


def _report_duplicates(dataset) -> None:
    inter = dataset.inter_feat
    uid, iid = dataset.uid_field, dataset.iid_field
    if inter is not None and uid in inter and iid in inter:
        repeated = int(inter.duplicated(subset=[uid, iid]).sum())
        if repeated:
            exact = int(inter.duplicated().sum())
            logger.warning(
                f"{dataset.dataset_name}: {repeated} interactions repeat an earlier (user, item) pair "
                f"({exact} are exact duplicate rows); they are kept. Set rm_dup_inter: first (or last) to drop them."
            )
    for frame, field, name in ((dataset.item_feat, iid, "item"), (dataset.user_feat, uid, "user")):
        if frame is not None and field in frame:
            repeated = int(frame.duplicated(subset=[field]).sum())
            if repeated:
                logger.warning(
                    f"{dataset.dataset_name}: {repeated} rows of the .{name} file repeat an {name} id; RecBole "
                    f"keeps one row per id. Remove the duplicates from the .{name} file."
                )


def _data_filtering_with_report(self) -> None:
    """RecBole's ``Dataset._data_filtering``, the same steps in the same order, with a warning per drop."""
    if not self.config["rm_dup_inter"]:
        _report_duplicates(self)
    for step, what, fix in _STEPS:
        before = _count(self.inter_feat), _count(self.item_feat), _count(self.user_feat)
        getattr(self, step)()
        after = _count(self.inter_feat), _count(self.item_feat), _count(self.user_feat)
        for kind, b, a in zip(("interactions", "item rows", "user rows"), before, after, strict=True):
            if a < b:
                logger.warning(
                    f"{self.dataset_name}: RecBole dropped {b - a} of {b} {kind} ({what}; see {fix})."
                )
    self._reset_index()


def install_filter_report() -> None:
    """Make every RecBole Dataset log what its filters drop (idempotent)."""
    from recbole.data.dataset import Dataset

    Dataset._data_filtering = _data_filtering_with_report
