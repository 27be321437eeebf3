"""Reading local data files (GLUE TSV, CSV, JSON lines, SQuAD JSON), plain or gzipped.

Every reader records the sha256 of the uncompressed bytes it read (the same digests as
shared/data/MANIFEST.md), so a run's env.json names exactly the data it saw. Malformed content
raises DataError naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skimbench.errors import DataError

DATA_DIR_ENV = "SKIMBENCH_DATA_DIR"


def data_dir_from(option: str | Path | None) -> Path | None:
    """The local data directory: the --data-dir option, else $SKIMBENCH_DATA_DIR, else none."""
    value = option if option is not None else os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} does not exist: point --data-dir or "
                        f"{DATA_DIR_ENV} at a folder laid out like shared/data (see README)")
    return path.resolve()


@dataclass
class FileLog:
    """The data files one run read, with the sha256 of their uncompressed content."""

    sha256: dict[str, str] = field(default_factory=dict)

    def find(self, root: Path, relative: str) -> Path | None:
        """The file `relative` (or `relative`.gz) under root, if present."""
        for candidate in (root / relative, root / f"{relative}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def read_text(self, path: Path) -> str:
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"cannot read data file {path}: {exc}") from None
        self.sha256[str(path)] = hashlib.sha256(raw).hexdigest()
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"data file {path} is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})") from None

    def read_tsv(self, path: Path, header: bool = True) -> list[dict[str, str] | list[str]]:
        """Rows of a GLUE TSV (no quoting, as GLUE writes them): dicts by header, else lists."""
        lines = self.read_text(path).splitlines()
        rows = [line.split("\t") for line in lines if line.strip()]
        if not header:
            return rows
        if not rows:
            raise DataError(f"data file {path} is empty: expected a header line")
        names, body = rows[0], rows[1:]
        out = []
        for number, row in enumerate(body, start=2):
            if len(row) < len(names):
                raise DataError(f"data file {path} line {number}: expected {len(names)} "
                                f"tab-separated columns ({', '.join(names)}), found {len(row)}")
            out.append(dict(zip(names, row, strict=False)))
        return out

    def read_csv(self, path: Path) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self.read_text(path))))

    def read_jsonl(self, path: Path) -> list[dict]:
        out = []
        for number, line in enumerate(self.read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data file {path} line {number}: not valid JSON ({exc.msg})"
                                ) from None
        return out

    def read_json(self, path: Path):
        try:
            return json.loads(self.read_text(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"data file {path} line {exc.lineno}: not valid JSON ({exc.msg})"
                            ) from None


def field_of(row: dict, key: str, path: Path, number: int):
    """row[key], or a DataError naming the file, the row and the missing field."""
    try:
        return row[key]
    except (KeyError, TypeError, IndexError):
        raise DataError(f"data file {path} row {number}: missing field {key!r}") from None
