"""EdgeModel: recommendations, search and similar items from a verified bundle, with ONNX Runtime.

A user is their history: catalog positions (newest first) with basket ages, read by the user tower
graph; no text is encoded to recommend. A search query goes through the query encoder graph into
the same space. Both give a row that scores every item by one product with the bundle's item
matrix, ranked by an index from `edge_runtime.index` (exact by default).

Search has three modes: dense (the query encoder's row against the item matrix), lexical (BM25
over the item texts, `edge_runtime.lexical`) and hybrid, the default: both scores of every item
fused as the bundle's manifest says (`edge_runtime.fusion`). Lexical and hybrid score the whole
catalog exactly (the int8 index, when used, serves dense search and recommendations).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from fedrec.edge_runtime.bundle import BundleError, BundleManifest, ModelFacts, open_bundle
from fedrec.edge_runtime.fusion import Fusion
from fedrec.edge_runtime.index import Index, ItemIndex, QuantizedIndex, top_k
from fedrec.edge_runtime.lexical import LexicalIndex

INT8_INDEX_FROM = 50_000     # below this an exact scan is as fast as the int8 one (BENCHMARKS.md)
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
SEARCH_MODES = ("hybrid", "dense", "lexical")


def check_mode(mode: str) -> str:
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; choose {', '.join(SEARCH_MODES)}")
    return mode


@dataclass(frozen=True)
class Result:
    item_id: str
    title: str
    score: float
    because: str | None = None          # for recommendations: the history item closest to it


class EdgeModel:
    """A bundle loaded for serving. Safe to call from many threads at once, as `fedrec serve`
    does: ONNX Runtime sessions are thread-safe to run, the tokenizers are configured once, here (a
    per-call change, as transformers makes, is what raises "Already borrowed" across threads),
    the catalog and the index are only read, and every call builds its own arrays."""

    def __init__(self, bundle: str | Path, precision: str = "int8", device: str = "cpu", threads: int = 1,
                 index: str = "auto"):
        """`precision`: fp32, int8, or fp16 (query encoder only, when exported for GPUs; the user
        tower then runs in fp32). `device`: cpu, or cuda / tensorrt through ONNX Runtime's GPU
        providers. `index`: "exact", "int8" (needs a bundle exported with --int8-index), or "auto":
        the int8 index when the bundle has one and the catalog has at least INT8_INDEX_FROM items.
        A .tar.gz bundle is unpacked into a temporary folder, gone once the model is loaded:
        everything is read into memory here."""
        self.source = Path(bundle)
        with tempfile.TemporaryDirectory(prefix="fedrec-bundle-") as unpacked:
            self.load(*open_bundle(bundle, unpacked), precision, device, threads, index)

    def load(self, folder: Path, manifest: BundleManifest, precision: str, device: str, threads: int,
             index: str) -> None:
        self.manifest = manifest.document
        model = manifest.model            # every file it names is one the bundle lists and verified
        graphs = model.onnx
        if precision not in graphs["query_encoder"]:
            raise BundleError(f"{self.source}: no {precision} model in this bundle (has "
                              f"{', '.join(graphs['query_encoder'])}); `fedrec export --{precision}` writes one")
        if device not in PROVIDERS:
            raise BundleError(f"unknown device {device!r}; choose cpu, cuda or tensorrt")
        wanted = PROVIDERS[device]
        if wanted[0] not in ort.get_available_providers():
            raise BundleError(f"{wanted[0]} is not available in this onnxruntime "
                              f"(has {', '.join(ort.get_available_providers())}); on a GPU machine install "
                              "onnxruntime-gpu in place of onnxruntime, or use device='cpu'")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        tower_file = graphs["user_tower"].get(precision, graphs["user_tower"]["fp32"])
        self.user_tower = ort.InferenceSession(str(folder / tower_file), options, providers=["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(folder / graphs["query_encoder"][precision]), options,
                                            providers=wanted)
        self.tokenizer = Tokenizer.from_file(str(folder / model.tokenizer))
        self.max_query_tokens = model.max_query_tokens
        self.tokenizer.enable_truncation(max_length=self.max_query_tokens)
        padding = self.tokenizer.padding or {}
        self.pad_id, pad_token = padding.get("pad_id", 0), padding.get("pad_token", "[PAD]")
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token)      # to the longest of a batch
        self.full_length = Tokenizer.from_str(self.tokenizer.to_str())             # always to the limit
        self.full_length.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=self.max_query_tokens)
        self.history_items = model.history_items
        catalog = json.loads((folder / model.items).read_text())
        self.item_ids: list[str] = catalog["item_ids"]
        self.titles: list[str] = catalog["titles"]
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        self.index = self.load_index(folder, model, index)
        try:
            self.lexical = LexicalIndex.load(folder, model.lexical, len(self.item_ids))
        except (KeyError, ValueError) as exc:           # LexicalIndexError is a ValueError
            raise BundleError(f"{self.source}: its lexical index is unreadable ({exc})") from exc
        self.fusion: Fusion = model.fusion

    def load_index(self, folder: Path, model: ModelFacts, kind: str) -> ItemIndex:
        if kind not in ("auto", "exact", "int8"):
            raise BundleError(f"unknown index {kind!r}; choose auto, exact or int8")
        vectors = np.load(folder / model.item_matrix)
        if kind == "int8" and model.item_index is None:
            raise BundleError(f"{self.source}: no int8 item index in this bundle; export it with "
                              "`fedrec export --int8-index`, or use index='exact'")
        if kind == "int8" or (kind == "auto" and model.item_index and len(vectors) >= INT8_INDEX_FROM):
            return QuantizedIndex((folder / model.item_index).read_bytes(), vectors)
        return Index(np.asfortranarray(vectors))    # its transpose contiguous: BLAS scores a few rows 2× faster

    # -- encoding --------------------------------------------------------------------------
    def inputs(self, queries: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
        """The query encoder's inputs for `queries`, padded to the longest of them, or with
        `length=max_query_tokens` to the limit (one shape per batch size, as a GPU engine wants):
        a tokenizer each, not one reconfigured per call (see the class)."""
        if length not in (None, self.max_query_tokens):
            raise ValueError(f"queries pad to the longest or to max_query_tokens ({self.max_query_tokens}), "
                             f"not {length}")
        encodings = (self.tokenizer if length is None else self.full_length).encode_batch(list(queries))
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.session.run(None, self.inputs(queries))[0]

    def embed_histories(self, histories: Sequence[Sequence[int]], ages: Sequence[Sequence[int]]) -> np.ndarray:
        """Users from catalog positions (newest first) and their basket ages, cut to the newest
        `history_items`."""
        length = max(1, min(self.history_items, max(map(len, histories))))
        positions = np.zeros((len(histories), length), dtype=np.int64)
        item_ages = np.zeros_like(positions)
        mask = np.zeros_like(positions)
        for row, (history, history_ages) in enumerate(zip(histories, ages)):
            n = min(length, len(history))
            positions[row, :n], item_ages[row, :n], mask[row, :n] = history[:n], history_ages[:n], 1
        return self.user_tower.run(None, {"history": positions, "ages": item_ages, "mask": mask})[0]

    def known(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """Catalog positions of the known ids, and the unknown ids (reported, then ignored)."""
        positions = [self.position[i] for i in item_ids if i in self.position]
        return positions, [i for i in item_ids if i not in self.position]

    def results(self, top: np.ndarray, scores: np.ndarray, because: Sequence[str | None] | None = None) -> list[Result]:
        because = because or [None] * len(top)
        return [Result(self.item_ids[i], self.titles[i], float(s), b) for i, s, b in zip(top, scores, because)]

    # -- the API ---------------------------------------------------------------------------
    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10, exclude_history: bool = True,
                        ages: Sequence[Sequence[int]] | None = None) -> list[list[Result]]:
        """For each history (item ids, newest first) the top k items and why. `ages` gives each
        history item's basket age (0 = the latest basket); by default a history is one basket."""
        ages = ages if ages is not None else [[0] * len(h) for h in histories]
        if len(ages) != len(histories) or any(len(a) != len(h) for a, h in zip(ages, histories)):
            raise ValueError("ages must give one basket age per history item")
        kept = [[(self.position[i], a) for i, a in zip(h, g) if i in self.position] for h, g in zip(histories, ages)]
        known = [[p for p, _ in pairs] for pairs in kept]
        users = self.embed_histories(known, [[a for _, a in pairs] for pairs in kept])
        top, scores = self.index.search(users, k, [np.array(p, dtype=np.int64) for p in known] if exclude_history else None)
        out = []
        for positions, items, values in zip(known, top, scores):
            because = None
            if positions:
                contribution = self.index.vectors[items, :-1] @ self.index.vectors[positions, :-1].T    # k × history
                because = [self.titles[positions[c]] for c in contribution.argmax(1)]
            out.append(self.results(items, values, because))
        return out

    def recommend(self, history_item_ids: Sequence[str], k: int = 10, exclude_history: bool = True,
                  ages: Sequence[int] | None = None) -> list[Result]:
        return self.recommend_batch([history_item_ids], k, exclude_history, None if ages is None else [ages])[0]

    def dense_scores(self, queries: Sequence[str]) -> np.ndarray:
        """queries × items: the model's search score of every item."""
        return self.embed_queries(queries) @ self.index.vectors.T

    def search_scores(self, queries: Sequence[str], mode: str = "hybrid") -> np.ndarray:
        """queries × items: every item's score in this search mode (what `search_batch` ranks)."""
        if check_mode(mode) == "lexical":
            return self.lexical.scores(queries)
        dense = self.dense_scores(queries)
        return dense if mode == "dense" else self.fusion.scores(dense, self.lexical.scores(queries))

    def search_batch(self, queries: Sequence[str], k: int = 10, mode: str = "hybrid") -> list[list[Result]]:
        """The top k items for each query; `mode`: hybrid, dense or lexical. Ties (such as the
        zero lexical score of items sharing no word with the query) come in no fixed order."""
        if check_mode(mode) == "dense":
            top, scores = self.index.search(self.embed_queries(queries), k)
        else:
            top, scores = top_k(self.search_scores(queries, mode), k)
        return [self.results(t, s) for t, s in zip(top, scores)]

    def search(self, query: str, k: int = 10, mode: str = "hybrid") -> list[Result]:
        return self.search_batch([query], k, mode)[0]

    def similar(self, item_id: str, k: int = 10) -> list[Result]:
        """What shoppers who just bought `item_id` buy: the user tower over that one item."""
        if item_id not in self.position:
            raise KeyError(item_id)
        position = self.position[item_id]
        top, scores = self.index.search(self.embed_histories([[position]], [[0]]), k, [np.array([position])])
        return self.results(top[0], scores[0])
