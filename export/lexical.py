"""Builds the bundle's BM25 index over the catalog's titles with `bm25s`, written as the plain
arrays `fedrec.edge_runtime.lexical` scores with numpy alone.

Titles are split as the edge splits queries: `bm25s.tokenize` with its default word pattern and
English stopwords, lower-cased, no stemming (the stopword list and the pattern travel in the
bundle, so the edge needs no bm25s). BM25 is bm25s's default, Lucene's variant, k1 = 1.5, b = 0.75.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from fedrec.atomic import write_json
from fedrec.edge_runtime.lexical import LexicalFiles

WORD_PATTERN = r"(?u)\b\w\w+\b"         # bm25s.tokenize's default, named so that the edge gets the same
BM25 = {"method": "lucene", "k1": 1.5, "b": 0.75}
FILES = LexicalFiles(vocabulary="lexical.json", data="lexical.data.npy", indices="lexical.indices.npy",
                     indptr="lexical.indptr.npy")


def title_tokens(titles: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(titles), lower=True, token_pattern=WORD_PATTERN, stopwords=STOPWORDS_EN,
                          return_ids=False, show_progress=False)


def bm25_index(titles: Sequence[str]) -> bm25s.BM25:
    """bm25s sets its logger to DEBUG when imported, so its notes reach any handler a host
    process has configured (Flower's, in the demo): quiet while it builds."""
    library = logging.getLogger("bm25s")
    level = library.level
    library.setLevel(logging.WARNING)
    try:
        retriever = bm25s.BM25(**BM25)
        retriever.index(title_tokens(titles), show_progress=False)
    finally:
        library.setLevel(level)
    return retriever


def write_lexical_index(titles: Sequence[str], folder: Path) -> LexicalFiles:
    """The index's files in `folder`; returns their names, for the manifest."""
    retriever = bm25_index(titles)
    vocabulary = {word: int(column) for word, column in retriever.vocab_dict.items() if word}   # "" is bm25s's empty-query token
    for name, array, dtype in ((FILES.data, retriever.scores["data"], np.float32),
                               (FILES.indices, retriever.scores["indices"], np.int32),
                               (FILES.indptr, retriever.scores["indptr"], np.int64)):
        np.save(folder / name, np.asarray(array, dtype=dtype))
    write_json(folder / FILES.vocabulary, {"library": f"bm25s {bm25s.__version__}", **BM25, "pattern": WORD_PATTERN,
                                           "stopwords": sorted(STOPWORDS_EN), "vocabulary": vocabulary})
    return FILES
