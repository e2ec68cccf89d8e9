"""Labelled text for classification: reading data files, re-indexing labels and holding out a
validation share.

:func:`read_examples` reads a CSV, JSON-lines or JSON-array file into ``(text, label index)``
pairs and the sorted label names; :func:`read_text_data` gives the same as a :class:`TextData`
value that renders itself, re-indexes a second file onto the training file's labels
(:meth:`TextData.relabel`) and splits off a validation share (:meth:`TextData.split`, or
:func:`split_validation` for bare examples) as a :class:`DataSplit`. ``tera-tn finetune`` reads
its ``--data-path``, ``--validation-path`` and ``--test-path`` files with these.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from decimal import Context, Decimal
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["Example", "TextData", "DataSplit", "read_examples", "read_text_data", "split_validation"]

#: one labelled example: its text and its label's index into the label names
Example = tuple[str, int]


_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
#: a label that reads as a decimal number (``1``, ``-2``, ``1.0``, ``.5``, ``1e3``) is a number;
#: ``inf``, ``nan``, ``1_000`` or ``0x1f`` are text
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class _Label:
    """One label value: a number (compared by value: 1, 1.0 and "01" are equal) or a text."""

    __slots__ = ("number", "text", "where")

    def __init__(self, number: Decimal | None, text: str | None, where: str) -> None:
        self.number, self.text, self.where = number, text, where

    @property
    def key(self) -> Decimal | str:
        return self.number if self.number is not None else self.text  # type: ignore[return-value]


def _number_name(d: Decimal) -> str:
    """The class name of a numeric label: the shortest plain decimal (``1.0`` → ``"1"``,
    ``0.50`` → ``"0.5"``, ``1e3`` → ``"1000"``); scientific beyond 30 digits."""
    if d == 0:
        return "0"
    d = d.normalize(Context(prec=max(1, len(d.as_tuple().digits))))  # exact: no digit is rounded away
    return format(d, "f") if -30 < d.adjusted() < 30 else str(d)


def _label(value: Any, where: str, column: str) -> _Label:
    if value is None:
        raise ValueError(f"{where} has no {column!r} value (null); every example needs a label")
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        kind = "a JSON boolean" if isinstance(value, bool) else f"a JSON {'array' if isinstance(value, list) else 'object'}"
        raise ValueError(f"{where} has {kind} {json.dumps(value)[:60]} as its {column!r}; expected a label: a string "
                         "or a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where} has the non-finite number {value!r} as its {column!r}; expected a finite "
                             "number or a string")
        return _Label(Decimal(value) if isinstance(value, int) else Decimal(repr(value)), None, where)
    if not isinstance(value, str):
        raise ValueError(f"{where} has {value!r:.60} ({type(value).__name__}) as its {column!r}; expected a string "
                         "or a number")
    text = value.strip()
    if not text:
        raise ValueError(f"{where} has an empty {column!r}; every example needs a label")
    return _Label(Decimal(text), None, where) if _NUMBER.fullmatch(text) else _Label(None, text, where)


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        raise ValueError(f"{where} has no {column!r} value (null); every example needs a text")
    if not isinstance(value, str):
        raise ValueError(f"{where} has {json.dumps(value, default=str)[:60]} ({type(value).__name__}) as its "
                         f"{column!r}; expected a string")
    if not value.strip():
        raise ValueError(f"{where} has an empty {column!r}; every example needs a text")
    return value


def _decode(path: Path, data: bytes, encoding: str) -> str:
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} for {str(path)!r}; expected a Python codec name "
                         "such as utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            guess, codec = "it starts like UTF-16 text: give that encoding", "utf-16"
        else:
            guess, codec = ("if it was saved as latin-1 or Windows cp1252 (as older Excel versions save CSV), give "
                            "that encoding"), "cp1252"
        raise ValueError(f"{str(path)!r} is not {encoding} text: byte 0x{data[err.start]:02x} on line {line} cannot "
                         f"be decoded; {guess} (encoding='{codec}'; --encoding {codec} on the command line) or save "
                         "the file as UTF-8") from None


def _json_records(path: Path, text: str) -> list[tuple[str, Any]]:
    """``(line or record, record)`` of a JSON-lines file, or of a ``.json`` file holding one JSON array."""
    name = repr(str(path))
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as err:
            where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
            raise ValueError(f"{name} is not valid JSON{where}: {getattr(err, 'msg', err)}; expected one JSON array "
                             "of objects, or one JSON object per line") from None
        return [(f"record {i}", r) for i, r in enumerate(data, 1)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except ValueError as err:
            raise ValueError(f"{name} line {n} is not valid JSON ({getattr(err, 'msg', err)}): {line.strip()[:60]!r}; "
                             "expected one JSON object per line (or, in a .json file, one JSON array)") from None
    return records


def _csv_records(path: Path, text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """``(line, {column: cell or None})`` of a CSV file with a header row, and the header."""
    import csv
    import io

    name = repr(str(path))
    limit = csv.field_size_limit()
    # A long text (a whole article) may exceed csv's default 128 KiB field limit; no field can be
    # longer than the file. The limit is process-wide, so it is restored afterwards.
    csv.field_size_limit(max(limit, min(len(text) + 1, 2**31 - 1)))
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip() for h in next(reader, [])]
        records = []
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            where = f"line {start}"
            if len(row) > len(header):
                raise ValueError(f"{name} {where} has {len(row)} cells but the header has {len(header)} "
                                 f"({', '.join(header)}); a text holding commas must be in double quotes")
            records.append((where, dict(zip(header, row + [None] * (len(header) - len(row))))))
    except csv.Error as err:
        raise ValueError(f"{name} line {reader.line_num} is not valid CSV ({err}); expected a CSV file with a header "
                         "row") from None
    finally:
        csv.field_size_limit(limit)
    return records, header


def read_examples(path: str | os.PathLike, text_column: str = "text", label_column: str = "label", *,
                  encoding: str = "utf-8", min_classes: int = 2) -> tuple[list[Example], tuple[str, ...]]:
    """``(examples, label_names)`` from a CSV file with a header row, a JSON-lines file (``.jsonl``,
    ``.ndjson``, ``.json``: one object per line) or a ``.json`` file holding one array of objects.

    * Text: ``encoding`` (default UTF-8; a UTF-8 byte-order mark, as in Excel's "CSV UTF-8", is
      skipped); a file that does not decode is refused naming the line.
    * Every record needs a non-empty text (a string) and a label; a missing, empty or null value,
      a JSON boolean, array or object as a label, a non-finite number, or a CSV row with more
      cells than the header is refused with an error naming the file and the line (the record
      for a JSON array), never read as a made-up class such as ``'None'``.
    * Labels that read as decimal numbers are numbers and compare by value: ``1``, ``1.0``,
      ``"01"`` and ``1e0`` are one class, named by its shortest plain form (``"1"``; ``0.50`` is
      ``"0.5"``). Number classes are sorted by value, text classes alphabetically; a file whose
      labels mix numbers and text is refused (``inf``/``nan`` are text, not numbers).
    * ``min_classes``: fewest distinct labels accepted (2 for training; 1 for a validation or
      test file, which may hold one class).

    Labels become indices into the sorted label names.
    """
    path = Path(path)
    name = repr(str(path))
    with open(path, "rb") as f:
        text = _decode(path, f.read(), encoding)
    if path.suffix.lower() in _JSON_SUFFIXES:
        records = _json_records(path, text)
        header = None
    else:
        records, header = _csv_records(path, text)
    if not records:
        raise ValueError(f"{name} holds no examples")
    if header is not None:
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise ValueError(f"{name} has no column {missing[0]!r}; expected columns {text_column!r} and "
                             f"{label_column!r}, found {header}")
    texts, labels = [], []
    for loc, row in records:
        where = f"{name} {loc}"
        if not isinstance(row, dict):
            kind = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(type(row), "null")
            raise ValueError(f"{where} is a JSON {kind}, not an object; expected an object with "
                             f"{text_column!r} and {label_column!r}")
        for c in (text_column, label_column):
            if c not in row:
                raise ValueError(f"{where} has no column {c!r}; expected columns {text_column!r} and "
                                 f"{label_column!r}, found {sorted(row)}")
        if header is not None and row[label_column] is None:
            raise ValueError(f"{where} has no {label_column!r} cell (the row is shorter than the header); every "
                             "example needs a label")
        if header is not None and row[text_column] is None:
            raise ValueError(f"{where} has no {text_column!r} cell (the row is shorter than the header)")
        texts.append(_text(row[text_column], where, text_column))
        labels.append(_label(row[label_column], where, label_column))
        labels[-1].where = loc
    numbers = [lab for lab in labels if lab.number is not None]
    if numbers and len(numbers) < len(labels):
        word = next(lab for lab in labels if lab.number is None)
        raise ValueError(f"{name} has labels that mix numbers and text: {numbers[0].where} has "
                         f"{_number_name(numbers[0].number)}, {word.where} has {word.text!r}; expected all labels "
                         "numbers or all text")
    keys = sorted({lab.key for lab in labels})  # type: ignore[type-var]
    names = tuple(_number_name(k) if isinstance(k, Decimal) else k for k in keys)
    if len(names) < min_classes:
        raise ValueError(f"{name} has a single label {names[0]!r} in column {label_column!r}; classification "
                         f"needs at least {min_classes}")
    index = {k: i for i, k in enumerate(keys)}
    return [(t, index[lab.key]) for t, lab in zip(texts, labels)], names


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
def _examples_tuple(what: str, examples: Any, n_labels: Optional[int]) -> tuple[Example, ...]:
    """``examples`` as a tuple of ``(str, int)`` pairs, or a ValueError naming ``what`` and the first bad one."""
    if isinstance(examples, (str, bytes)) or not hasattr(examples, "__iter__"):
        raise ValueError(f"{what} needs a sequence of (text, label index) pairs, got {type(examples).__name__}")
    out = []
    for i, ex in enumerate(examples):
        ok = not isinstance(ex, (str, bytes)) and hasattr(ex, "__len__") and len(ex) == 2
        text, label = ex if ok else (None, None)
        ok = ok and isinstance(text, str) and isinstance(label, int) and not isinstance(label, bool) and label >= 0
        if not ok or (n_labels is not None and label >= n_labels):
            raise ValueError(f"{what} example {i} is {ex!r:.80}; expected a (text, label index) pair with an index "
                             f"in 0..{'K-1' if n_labels is None else n_labels - 1}")
        out.append((text, label))
    return tuple(out)


def _share(n: int, total: int) -> str:
    return f"{n:,} ({n / total:.0%})" if total else "0"


@dataclass(frozen=True)
class TextData:
    """The labelled examples of one data file (:func:`read_text_data`).

    Attributes:
        examples: ``(text, label index)`` pairs in file order.
        labels: the label names; ``examples`` index into them.
        path: the file they were read from (``""`` when built in memory).
    """

    examples: tuple[Example, ...]
    labels: tuple[str, ...]
    path: str = ""

    def __post_init__(self) -> None:
        labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else None
        if not labels or not all(isinstance(n, str) for n in labels) or len(set(labels)) != len(labels):
            raise ValueError(f"TextData labels must be distinct strings, got {self.labels!r:.80}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "examples", _examples_tuple("TextData", self.examples, len(labels)))
        object.__setattr__(self, "path", str(self.path))

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def counts(self) -> dict[str, int]:
        """Examples per label name, in label order."""
        counts = [0] * len(self.labels)
        for _, y in self.examples:
            counts[y] += 1
        return dict(zip(self.labels, counts))

    def relabel(self, labels: Sequence[str]) -> "TextData":
        """The same examples indexed into ``labels`` (the training file's label names), e.g. for a
        validation or test file whose labels are a subset of them; a label outside ``labels`` is
        refused naming this file."""
        labels = tuple(labels)
        unknown = sorted(set(self.labels) - set(labels))
        if unknown:
            raise ValueError(f"{self.path!r} has labels {unknown[:5]} that the training data lacks; expected labels "
                             f"among {list(labels)[:20]}")
        index = {n: i for i, n in enumerate(labels)}
        return TextData(tuple((t, index[self.labels[y]]) for t, y in self.examples), labels, self.path)

    def split(self, fraction: float, seed: int) -> "DataSplit":
        """:func:`split_validation` of these examples."""
        return split_validation(self.examples, fraction, seed)

    def to_dict(self) -> dict:
        """JSON-ready summary: path, example count, label names and examples per label (not the texts)."""
        return {"path": self.path, "examples": len(self.examples), "labels": list(self.labels), "counts": self.counts}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_text(self) -> str:
        """One line: the file, the number of examples and the examples per label."""
        counts = ", ".join(f"{n} {_share(c, len(self))}" for n, c in self.counts.items())
        where = f"{self.path}: " if self.path else ""
        return f"{where}{len(self):,} examples, {len(self.labels)} labels ({counts})"

    def __str__(self) -> str:
        return self.to_text()


def read_text_data(path: str | os.PathLike, text_column: str = "text", label_column: str = "label", *,
                   encoding: str = "utf-8", min_classes: int = 2) -> TextData:
    """:func:`read_examples` as a :class:`TextData` value (same arguments, same errors)."""
    examples, labels = read_examples(path, text_column, label_column, encoding=encoding, min_classes=min_classes)
    return TextData(tuple(examples), labels, os.fspath(path))


@dataclass(frozen=True)
class DataSplit:
    """Training and validation examples split from one file (:func:`split_validation`).

    Attributes:
        train, validation: the two parts, in shuffled order.
        fraction: the share asked for in validation.
        seed: the seed of the shuffle.
    """

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    fraction: float
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", _examples_tuple("DataSplit train", self.train, None))
        object.__setattr__(self, "validation", _examples_tuple("DataSplit validation", self.validation, None))

    def to_dict(self) -> dict:
        """JSON-ready summary: the sizes of both parts, the fraction and the seed."""
        return {"train": len(self.train), "validation": len(self.validation), "fraction": self.fraction,
                "seed": self.seed}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """One line: both sizes, the fraction and the seed."""
        total = len(self.train) + len(self.validation)
        return (f"{len(self.train):,} training and {len(self.validation):,} validation examples "
                f"({self.fraction:g} of {total:,} held out, seed {self.seed})")

    def __str__(self) -> str:
        return self.to_text()


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> DataSplit:
    """Hold out ``fraction`` of ``examples`` for validation: shuffled by ``random.Random(seed)``,
    the first ``max(1, round(fraction * n))`` are the validation part, the rest train. The same
    seed gives the same split on every machine.

    Raises ValueError (naming ``split_validation``) for a fraction outside (0, 1), a seed that is
    not a non-negative integer, or a split that would leave either part empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            math.isfinite(fraction) and 0 < fraction < 1):
        raise ValueError(f"split_validation: fraction must be a number in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"split_validation: seed must be a non-negative integer, got {seed!r}")
    shuffled = list(_examples_tuple("split_validation", examples, None))
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(fraction * len(shuffled)))
    if n_val >= len(shuffled):
        raise ValueError(f"split_validation: holding out {fraction:g} of {len(shuffled)} example(s) leaves none to "
                         "train on; expected more examples or a smaller fraction")
    return DataSplit(tuple(shuffled[n_val:]), tuple(shuffled[:n_val]), float(fraction), seed)
