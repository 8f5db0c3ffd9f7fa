"""EdgeModel: recommendations, search and similar items from a verified bundle, with ONNX Runtime.

Users and queries are encoded on the fly; items come precomputed (float16, L2-normalised) and are
ranked by an index from `edge_runtime.index` (exact by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from fedrec.edge_runtime.bundle import BundleError, open_bundle
from fedrec.edge_runtime.context_tokens import ContextTokens
from fedrec.edge_runtime.index import Index, ItemIndex, QuantizedIndex
from fedrec.text import context_text

INT8_INDEX_FROM = 50_000     # below this an exact scan is as fast as the int8 one (BENCHMARKS.md)
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass(frozen=True)
class Result:
    item_id: str
    title: str
    score: float
    because: str | None = None          # for recommendations: the history item that contributed most


class EdgeModel:
    def __init__(self, bundle: str | Path, precision: str = "int8", device: str = "cpu", threads: int = 1,
                 index: str = "auto"):
        """`precision`: a key of the manifest's "onnx" (fp32, int8, and fp16 when exported for GPUs).
        `device`: cpu, or cuda / tensorrt through ONNX Runtime's GPU providers.
        `index`: "exact", "int8" (needs a bundle exported with --int8-index), or "auto": the int8
        index when the bundle has one and the catalog has at least INT8_INDEX_FROM items."""
        self.folder = open_bundle(bundle)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        model = self.manifest["model"]
        files = model["onnx"]
        if precision not in files:
            raise BundleError(f"{self.folder}: no {precision} model in this bundle (has {', '.join(files)}); "
                              f"`fedrec export --{precision}` writes one")
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
        self.session = ort.InferenceSession(str(self.folder / files[precision]), options, providers=wanted)
        self.tokenizer = Tokenizer.from_file(str(self.folder / model["tokenizer"]))
        self.max_context_tokens = model["max_context_tokens"]
        self.tokenizer.enable_truncation(max_length=self.max_context_tokens)
        self.pad_id = (self.tokenizer.padding or {}).get("pad_id", 0)
        self.tokenizer.no_padding()                     # `embed_ids` pads, for texts and cached ids alike
        self.context_items = model["context_items"]
        catalog = json.loads((self.folder / model["items"]).read_text())
        self.item_ids: list[str] = catalog["item_ids"]
        self.titles: list[str] = catalog["titles"]
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        self.context_tokens = ContextTokens(self.tokenizer, self.titles, self.max_context_tokens, self.context_items)
        self.index = self.load_index(model, index)

    def load_index(self, model: dict, kind: str) -> ItemIndex:
        if kind not in ("auto", "exact", "int8"):
            raise BundleError(f"unknown index {kind!r}; choose auto, exact or int8")
        vectors = np.load(self.folder / model["item_embeddings"])
        if kind == "int8" and "item_index" not in model:
            raise BundleError(f"{self.folder}: no int8 item index in this bundle; export it with "
                              "`fedrec export --int8-index`, or use index='exact'")
        if kind == "int8" or (kind == "auto" and "item_index" in model and len(vectors) >= INT8_INDEX_FROM):
            return QuantizedIndex((self.folder / model["item_index"]).read_bytes(), vectors)
        return Index(vectors)

    # -- encoding --------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_ids([e.ids for e in self.tokenizer.encode_batch(list(texts))])

    def inputs(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> dict[str, np.ndarray]:
        """The encoder's inputs for token id sequences, padded to the longest (or to `length`)."""
        ids = np.full((len(sequences), length or max(map(len, sequences))), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def embed_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        return self.session.run(None, self.inputs(sequences))[0]

    def embed_histories(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Users from catalog positions, newest first (`context_tokens` skips re-tokenizing titles)."""
        if self.context_tokens.usable:
            return self.embed_ids([self.context_tokens.ids(h) for h in histories])
        return self.embed([self.context_tokens.text(h) for h in histories])

    def known(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """Catalog positions of the known ids, and the unknown ids (reported, then ignored)."""
        positions = [self.position[i] for i in item_ids if i in self.position]
        return positions, [i for i in item_ids if i not in self.position]

    def results(self, top: np.ndarray, scores: np.ndarray, because: Sequence[str | None] | None = None) -> list[Result]:
        because = because or [None] * len(top)
        return [Result(self.item_ids[i], self.titles[i], float(s), b) for i, s, b in zip(top, scores, because)]

    # -- the API ---------------------------------------------------------------------------
    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10,
                        exclude_history: bool = True) -> list[list[Result]]:
        """For each history (item ids, newest first): the top k items and why."""
        known = [self.known(h)[0] for h in histories]
        users = self.embed_histories(known)
        top, scores = self.index.search(users, k, [np.array(p, dtype=np.int64) for p in known] if exclude_history else None)
        out = []
        for positions, items, values in zip(known, top, scores):
            because = None
            if positions:
                contribution = self.index.vectors[items] @ self.index.vectors[positions].T    # k × history
                because = [self.titles[positions[c]] for c in contribution.argmax(1)]
            out.append(self.results(items, values, because))
        return out

    def recommend(self, history_item_ids: Sequence[str], k: int = 10, exclude_history: bool = True) -> list[Result]:
        return self.recommend_batch([history_item_ids], k, exclude_history)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Result]]:
        users = self.embed([context_text([], q) for q in queries])
        top, scores = self.index.search(users, k)
        return [self.results(t, s) for t, s in zip(top, scores)]

    def search(self, query: str, k: int = 10) -> list[Result]:
        return self.search_batch([query], k)[0]

    def similar(self, item_id: str, k: int = 10) -> list[Result]:
        if item_id not in self.position:
            raise KeyError(item_id)
        position = self.position[item_id]
        top, scores = self.index.search(self.index.vectors[[position]], k, [np.array([position])])
        return self.results(top[0], scores[0])
