"""Reading labelled CSV files with errors a user can act on."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.errors import InputError


def read_labelled_csv(path: Path, text_col: str = "text", label_col: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV; empty texts are an error, not silently dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}: not valid UTF-8 (line {line}, byte {exc.start})") from None
    try:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        columns = reader.fieldnames or []
        missing = [c for c in (text_col, label_col) if c not in columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; the file has {', '.join(columns) or 'no header'} "
                             f"(choose others with --text-col / --label-col)")
        texts, labels = [], []
        for row in reader:
            text, label = (row.get(text_col) or "").strip(), (row.get(label_col) or "").strip()
            if not text or not label:
                raise InputError(f"{path}:{reader.line_num}: empty {'text' if not text else 'label'}")
            texts.append(text)
            labels.append(label)
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV ({exc})") from None
    if not texts:
        raise InputError(f"{path}: no rows")
    return texts, labels
