"""Top-k item indexes for the edge runtime (numpy and ONNX Runtime only).

`Index` is exact: one float32 matrix product over every item vector. `QuantizedIndex` scans int8
item vectors with ONNX Runtime's packed integer GEMM (a quarter of the bytes, which is what a
one-query scan is bound by) and re-scores its best `rerank` candidates exactly in float32, so it
returns the exact top-k unless a true top-k item falls outside the int8 top-`rerank`. Its scan
graph is built at export time (`fedrec.export.item_index`), so the runtime needs no `onnx` package.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

ZERO_POINT = 128          # queries are quantized to uint8 around this zero point


class ItemIndex:
    """Top-k item positions and scores for a batch of queries; `search_one` for one query."""

    vectors: np.ndarray

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search_one(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        top, scores = self.search(query[None, :], k)
        return top[0], scores[0]


class Index(ItemIndex):
    """Exact top-k by inner product over all item vectors."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors.astype(np.float32)

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        if exclude:
            for row, items in enumerate(exclude):
                scores[row, items] = -np.inf
        return top_k(scores, k)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best columns and their scores, best first."""
    n = scores.shape[1]
    k = min(k, n)
    top = np.argpartition(scores, n - k, axis=1)[:, n - k:]
    best = np.take_along_axis(scores, top, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(top, order, 1), np.take_along_axis(best, order, 1)


class QuantizedIndex(ItemIndex):
    """int8 scan with ONNX Runtime, then exact float32 re-scoring of the best `rerank` candidates."""

    def __init__(self, scan_model: bytes, vectors: np.ndarray, rerank: int = 100, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(scan_model, options, providers=["CPUExecutionProvider"])
        self.vectors, self.rerank = vectors, rerank

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(queries).astype(np.float32)
        scale = np.maximum(np.abs(queries).max(1, keepdims=True), 1e-12) / 127
        quantized = (np.round(queries / scale) + ZERO_POINT).astype(np.uint8)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        wanted = min(len(self.vectors), max(self.rerank, k) + extra)
        _, candidates = self.session.run(None, {"query": quantized, "k": np.array([wanted], dtype=np.int64)})
        top, scores = [], []
        for row, found in enumerate(candidates):
            if exclude:
                found = found[~np.isin(found, exclude[row])]
            exact = self.vectors[found].astype(np.float32) @ queries[row]
            order = np.argsort(-exact, kind="stable")[:k]
            top.append(found[order])
            scores.append(exact[order])
        return np.array(top), np.array(scores)
