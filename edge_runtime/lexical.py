"""BM25 lexical scores over the catalog's titles, with numpy alone.

The index is built at export by the `bm25s` library (`fedrec.export.lexical`) and shipped as its
own arrays: a tokens × items CSC matrix of precomputed BM25 weights (data, indices, indptr) and the
vocabulary. A query's score for an item is the sum of its tokens' weights, a token counted as
often as the query repeats it; this is what `bm25s.BM25.get_scores` computes, and the query is
split as `bm25s.tokenize` splits: lower-cased, words of two or more word characters, the bundle's
stopwords dropped, no stemming. Words not in the vocabulary score nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


class LexicalIndexError(ValueError):
    """The lexical index's files do not fit together."""


@dataclass(frozen=True)
class LexicalFiles:
    """The manifest's `model.lexical` section: the files of one index."""
    vocabulary: str         # JSON: word → column, stopwords, word pattern, BM25 parameters
    data: str               # float32 BM25 weights, column by column
    indices: str            # the item of each weight
    indptr: str             # where each column starts in data and indices


class LexicalIndex:
    def __init__(self, vocabulary: dict[str, int], stopwords: Sequence[str], pattern: str,
                 data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, items: int):
        columns = len(indptr) - 1
        if not (len(data) == len(indices) == indptr[-1] and np.all(np.diff(indptr) >= 0)):
            raise LexicalIndexError("data, indices and indptr do not describe one sparse matrix")
        if len(indices) and not 0 <= indices.min() <= indices.max() < items:
            raise LexicalIndexError(f"an item position outside the catalog of {items} items")
        if vocabulary and not 0 <= min(vocabulary.values()) <= max(vocabulary.values()) < columns:
            raise LexicalIndexError(f"a vocabulary column outside the matrix's {columns} columns")
        self.vocabulary, self.stopwords = vocabulary, frozenset(stopwords)
        self.words = re.compile(pattern).findall
        self.data, self.indices, self.indptr, self.items = data, indices, indptr, items

    @classmethod
    def load(cls, folder: Path, files: LexicalFiles, items: int) -> LexicalIndex:
        meta = json.loads((folder / files.vocabulary).read_text())
        return cls(meta["vocabulary"], meta["stopwords"], meta["pattern"],
                   np.load(folder / files.data), np.load(folder / files.indices), np.load(folder / files.indptr),
                   items)

    def tokens(self, query: str) -> list[int]:
        """The query's vocabulary columns, in order, repeats kept."""
        return [self.vocabulary[w] for w in self.words(query.lower())
                if w not in self.stopwords and w in self.vocabulary]

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """queries × items BM25 scores, float32; zero where no query word occurs."""
        out = np.zeros((len(queries), self.items), dtype=np.float32)
        for row, query in enumerate(queries):
            for column in self.tokens(query):
                start, end = self.indptr[column], self.indptr[column + 1]
                out[row, self.indices[start:end]] += self.data[start:end]     # an item once per column
        return out
