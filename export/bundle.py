"""Building a bundle. The layout and manifest are what `fedrec.edge_runtime` verifies and reads:

    user_tower.{fp32,int8}.onnx     history (catalog positions, basket ages, mask) → user vector
    query_encoder.{fp32,int8}.onnx  query tokens → user vector (the student, or the teacher's encoder)
    tokenizer.json  items.npy (item matrix, float32)  items.json (ids and titles)
    lexical.json  lexical.{data,indices,indptr}.npy (BM25 over the item texts, `export.lexical`)
    [query_encoder.fp16.onnx  query_encoder.fp16.plan  items.int8.onnx]
    manifest.json (format version, model facts, metrics, privacy, files)
    manifest.sha256 (the SHA-256 of manifest.json, written last)

Recommendation never encodes text: the user tower reads the item vectors it was trained with
(constants in its graph), and a user scores every item by one product with items.npy. Search
runs the query encoder, whose output lands in the same space. Both graphs end in a row that
`items.npy` ([v/τ, w·t/τ, b]) is multiplied by: [u, p, 1] for a history, [λ·u, p, λ] for a query.

query_encoder.fp16.onnx carries its precision in the graph (float16 weights and compute, float32
inputs and outputs), which is what GPU runtimes want: ONNX Runtime's CUDA and TensorRT providers
run it as typed, and the TensorRT engine is built from it as a strongly typed network.
"""

from __future__ import annotations

import tarfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import fedrec
from fedrec.atomic import atomic_dir, atomic_file, write_json
from fedrec.data.silo import Catalog
from fedrec.edge_runtime.bundle import DIGEST, FORMAT_VERSION, MANIFEST, digest_line, sha256_file, verify_bundle
from fedrec.edge_runtime.fusion import DEFAULT_FUSION, Fusion
from fedrec.export.lexical import write_lexical_index
from fedrec.model.checkpoints import load_checkpoint
from fedrec.model.encoding import TextEncoder
from fedrec.model.teacher import Teacher
from fedrec.privacy.claims import claims_to_json, parse_claims


class UserTowerGraph(torch.nn.Module):
    """history, ages, mask (B × L, int64) → B × (d + text_dim + 1)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, history: torch.Tensor, ages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.teacher.user_matrix(self.teacher.tower.users(history, ages, mask > 0))


class QueryGraph(torch.nn.Module):
    """input_ids, attention_mask → B × (d + text_dim + 1): `Teacher.search_rows` through `text_encoder`."""

    def __init__(self, teacher: Teacher, text_encoder: TextEncoder):
        super().__init__()
        self.teacher, self.text_encoder = teacher, text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.teacher.search_rows(self.text_encoder(input_ids, attention_mask))


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    dynamic = {name: {0: "batch", 1: "length"} for name in names} | {"user": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")           # tracer notes about Python-side shapes: nothing to act on
        torch.onnx.export(module, example, str(path), input_names=names, output_names=["user"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def quantize_int8(source: Path, target: Path, block: int = 32) -> None:
    """Weight-only int8: every MatMul weight in symmetric 8-bit blocks of `block` rows (ONNX
    Runtime's MatMulNBits, computed in int8 with each row's activations scaled on their own).
    Dynamic quantization scaled activations over the whole batch, so a query scored differently
    alone and among others; here a row's result does not depend on the batch. ONNX Runtime's
    MatMulNBitsQuantizer writes the same nodes, but needs the onnx_ir package."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    model = onnx.load(str(source))
    weights = {w.name: w for w in model.graph.initializer}
    nodes, quantized = [], {}
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        if weight.name not in quantized:
            values = numpy_helper.to_array(weight).astype(np.float32)
            rows, cols = values.shape
            blocks = -(-rows // block)
            packed = np.zeros((cols, blocks, block), np.uint8)
            scales = np.zeros((cols, blocks), np.float32)
            quantize_matmul_8bits(packed, np.pad(values, ((0, blocks * block - rows), (0, 0))), scales,
                                  np.zeros((cols, blocks), np.uint8), block, cols, rows, True)
            quantized[weight.name] = (rows, cols, numpy_helper.from_array(packed, f"{weight.name}.int8"),
                                      numpy_helper.from_array(scales, f"{weight.name}.scale"))
        rows, cols, packed, scales = quantized[weight.name]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], packed.name, scales.name], node.output,
                                      name=node.name, domain="com.microsoft", K=rows, N=cols, bits=8,
                                      block_size=block, accuracy_level=4))
    used = {name for node in nodes for name in node.input}
    kept = [w for w in model.graph.initializer if w.name in used]
    kept += [tensor for *_, packed, scales in quantized.values() for tensor in (packed, scales)]
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(target))


def convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


def export_bundle(checkpoint: str | Path, catalog: Catalog, out: str | Path, int8: bool = True,
                  tensorrt: bool = False, tar: bool = False, metrics: dict | None = None,
                  int8_index: bool = False, fp16: bool = False, fusion: Fusion = DEFAULT_FUSION) -> Path:
    """`fp16` adds the float16 query encoder for GPUs (`tensorrt` implies it: the engine is built
    from it); `int8_index` adds the int8 item scan (`edge_runtime.index.QuantizedIndex`); `fusion`
    is how hybrid search combines the model's and BM25's scores (`fedrec search-eval --tune`
    measures the choices on judged queries)."""
    checkpoint, out = Path(checkpoint), Path(out)
    loaded = load_checkpoint(checkpoint, catalog)
    teacher, text_encoder, tokenizer_json, meta = (loaded.teacher.cpu().eval(), loaded.text_encoder.cpu().eval(),
                                                    loaded.tokenizer_json, loaded.meta)
    claims = parse_claims(meta.get("privacy", {}), f"{checkpoint}'s privacy claims")   # a bad one fails before any work
    config = teacher.config
    items = teacher.item_matrix().numpy().astype(np.float32)
    history = torch.tensor([[0, 1, 2], [3, 0, 0]])
    example_history = (history, torch.tensor([[0, 0, 1], [0, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    tokens = text_encoder.tokenize(["a small example", "another one"], 16)
    example_query = (tokens["input_ids"], tokens["attention_mask"])
    with atomic_dir(out) as tmp:
        graphs = {"user_tower": {}, "query_encoder": {}}
        for graph, module, example, names in (
                ("user_tower", UserTowerGraph(teacher), example_history, ["history", "ages", "mask"]),
                ("query_encoder", QueryGraph(teacher, text_encoder), example_query, ["input_ids", "attention_mask"])):
            export_onnx(module, example, names, tmp / f"{graph}.fp32.onnx")
            graphs[graph]["fp32"] = f"{graph}.fp32.onnx"
            if int8:
                quantize_int8(tmp / f"{graph}.fp32.onnx", tmp / f"{graph}.int8.onnx")
                graphs[graph]["int8"] = f"{graph}.int8.onnx"
        if fp16 or tensorrt:
            convert_fp16(tmp / "query_encoder.fp32.onnx", tmp / "query_encoder.fp16.onnx")
            graphs["query_encoder"]["fp16"] = "query_encoder.fp16.onnx"
        if tensorrt:
            from fedrec.export.tensorrt import build_engine

            build_engine(tmp / "query_encoder.fp16.onnx", tmp / "query_encoder.fp16.plan", config.max_query_tokens)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        np.save(tmp / "items.npy", items)
        if int8_index:
            from fedrec.export.item_index import int8_scan_model

            (tmp / "items.int8.onnx").write_bytes(int8_scan_model(items))
        write_json(tmp / "items.json", {"item_ids": catalog.item_ids, "titles": catalog.titles})
        lexical = write_lexical_index(catalog.texts(), tmp)
        counts = teacher.parameter_counts()
        manifest = {
            "format_version": FORMAT_VERSION,
            "fedrec_version": fedrec.__version__,
            "source": checkpoint.resolve().name,         # a name: the builder's folders stay private
            "model": {
                "kind": meta["kind"], "dim": config.dim, "text_dim": teacher.tower.text.shape[1],
                "history_items": config.history_items, "max_age": config.max_age,
                "max_query_tokens": config.max_query_tokens,
                "parameters": {"tower": counts["tower"],
                               "query_encoder": sum(p.numel() for p in text_encoder.parameters())},
                "onnx": graphs, "tokenizer": "tokenizer.json", "item_matrix": "items.npy",
                "items": "items.json", "items_count": len(catalog),
                "lexical": asdict(lexical), "fusion": asdict(fusion),
                **({"tensorrt_engine": "query_encoder.fp16.plan"} if tensorrt else {}),
                **({"item_index": "items.int8.onnx"} if int8_index else {}),
            },
            "metrics": metrics or {},
            "privacy": {"regions": claims_to_json(claims),
                        "statement": "ε per region as recorded in the regions' ledgers; the student and this "
                                     "bundle are post-processing of the DP teacher on public inputs"
                                     if claims else "no DP claim: the source model carries none"},
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        write_json(tmp / MANIFEST, manifest)
        (tmp / DIGEST).write_bytes(digest_line((tmp / MANIFEST).read_bytes()))
        verify_bundle(tmp)
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        with atomic_file(archive, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as bundle:
            bundle.add(out, arcname=out.name)
    return out
