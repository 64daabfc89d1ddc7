"""Readers for instruction data (JSON / JSONL) and text-classification TSV files.

Every reader validates as it goes and raises :class:`~fedblend.errors.DataError` with the
file (and record) at fault, so a bad file never reaches training.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from fedblend.errors import DataError


@dataclass(frozen=True)
class Example:
    """One instruction-following example: prompt text, reference response, task name."""

    instruction: str
    output: str
    task: str = ""
    label: str = ""  # class label for label-skew partitioning (defaults to the output)


def _check_record(rec: object, path: Path, idx: int) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: record {idx} is not a JSON object")
    for key in ("instruction", "output"):
        if key not in rec:
            raise DataError(f"{path}: record {idx} lacks the field '{key}'")
        if not isinstance(rec[key], str):
            raise DataError(f"{path}: record {idx}: field '{key}' is not a string")
    task = rec.get("task", "")
    return Example(
        instruction=rec["instruction"],
        output=rec["output"],
        task=str(task) if task is not None else "",
        label=str(rec.get("label", rec["output"])),
    )


def read_instructions(path: Path) -> list[Example]:
    """Read a JSON list or a JSONL file of ``{instruction, output[, task]}`` records."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file: {e.__class__.__name__}: {e}") from None
    if not text.strip():
        raise DataError(f"{path}: data file is empty")
    records: list[object]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from None
        records = list(loaded)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON: {e}") from None
    if not records:
        raise DataError(f"{path}: data file holds no records")
    return [_check_record(r, path, i) for i, r in enumerate(records)]


def read_tsv(
    path: Path,
    text_column: str,
    label_column: str,
    has_header: bool,
    label_names: list[str],
    template: str,
    task: str,
) -> list[Example]:
    """Read a text-classification TSV into examples whose output is the label's name.

    Without a header the first column is the text and the second the label. Integer
    labels are mapped through ``label_names`` when given.
    """
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file: {e.__class__.__name__}: {e}") from None
    if has_header:
        if not rows:
            raise DataError(f"{path}: data file is empty")
        header, rows = rows[0], rows[1:]
        for col in (text_column, label_column):
            if col not in header:
                raise DataError(f"{path}: no column '{col}' in header {header}")
        ti, li = header.index(text_column), header.index(label_column)
    else:
        ti, li = 0, 1
    out: list[Example] = []
    for n, row in enumerate(rows, start=2 if has_header else 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ti, li):
            raise DataError(f"{path}: line {n}: expected at least {max(ti, li) + 1} columns")
        label = row[li].strip()
        if label_names and label.isdigit():
            idx = int(label)
            if idx >= len(label_names):
                raise DataError(f"{path}: line {n}: label {idx} has no entry in data.label_names")
            label = label_names[idx]
        out.append(Example(template.format(text=row[ti].strip()), label, task, label))
    if not out:
        raise DataError(f"{path}: data file holds no rows")
    return out
