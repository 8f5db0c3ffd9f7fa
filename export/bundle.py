"""Building a bundle. The layout and manifest are what `fedrec.edge_runtime` verifies and reads:

    encoder.fp32.onnx  encoder.int8.onnx  tokenizer.json  items.npy (float16)  items.json
    [encoder.fp16.onnx  encoder.fp16.plan  items.int8.onnx]
    manifest.json (format version, model facts, metrics, privacy, files)

encoder.fp16.onnx carries its precision in the graph (float16 weights and compute, float32 inputs
and outputs), which is what GPU runtimes want: ONNX Runtime's CUDA and TensorRT providers run it
as typed, and the TensorRT engine is built from it as a strongly typed network.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch

import fedrec
from fedrec.atomic import atomic_dir, atomic_file, write_json
from fedrec.data.silo import Catalog
from fedrec.edge_runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file, verify_bundle
from fedrec.evaluation.evaluate import load_encoder
from fedrec.model.encoding import TextEncoder


class ExportWrapper(torch.nn.Module):
    """input_ids, attention_mask → L2-normalised embeddings, with LoRA merged into a teacher."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


def prepared_for_export(checkpoint: Path) -> tuple[TextEncoder, str, dict]:
    """The encoder (teacher adapters merged), its tokenizer JSON and its metadata."""
    from fedrec.distill.student import STUDENT_FILE

    encoder = load_encoder(checkpoint).cpu().eval()
    if (checkpoint / STUDENT_FILE).is_file():
        meta = json.loads((checkpoint / STUDENT_FILE).read_text())
        return encoder, encoder.tokenizer_json, {**meta, "kind": "student"}
    meta = json.loads((checkpoint / "teacher.json").read_text())
    encoder.encoder = encoder.encoder.merge_and_unload()       # plain BERT weights, no adapters
    spec = json.loads(encoder.tokenizer.backend_tokenizer.to_str())
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": encoder.tokenizer.pad_token_id, "pad_type_id": 0, "pad_token": encoder.tokenizer.pad_token}
    spec["truncation"] = {"max_length": encoder.config.max_context_tokens, "strategy": "LongestFirst",
                          "stride": 0, "direction": "Right"}
    return encoder, json.dumps(spec, ensure_ascii=False), {**meta, "kind": "teacher"}


def export_onnx(encoder: TextEncoder, path: Path) -> None:
    ids = encoder.tokenize(["a small example", "another one"], 16)
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
               "embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(ExportWrapper(encoder), (ids["input_ids"], ids["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


def export_bundle(checkpoint: str | Path, catalog: Catalog, out: str | Path, int8: bool = True,
                  tensorrt: bool = False, tar: bool = False, metrics: dict | None = None,
                  int8_index: bool = False, fp16: bool = False) -> Path:
    """`fp16` adds the float16 encoder for GPUs (`tensorrt` implies it: the engine is built from it);
    `int8_index` adds the int8 item scan (`edge_runtime.index.QuantizedIndex`), for large catalogs."""
    checkpoint, out = Path(checkpoint), Path(out)
    encoder, tokenizer_json, meta = prepared_for_export(checkpoint)
    items = encoder.encode_items(catalog).cpu().numpy().astype(np.float16)
    with atomic_dir(out) as tmp:
        export_onnx(encoder, tmp / "encoder.fp32.onnx")
        onnx_files = {"fp32": "encoder.fp32.onnx"}
        if int8:
            quantize_int8(tmp / "encoder.fp32.onnx", tmp / "encoder.int8.onnx")
            onnx_files["int8"] = "encoder.int8.onnx"
        if fp16 or tensorrt:
            convert_fp16(tmp / "encoder.fp32.onnx", tmp / "encoder.fp16.onnx")
            onnx_files["fp16"] = "encoder.fp16.onnx"
        if tensorrt:
            from fedrec.export.tensorrt import build_engine

            build_engine(tmp / "encoder.fp16.onnx", tmp / "encoder.fp16.plan", encoder.config.max_context_tokens)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        np.save(tmp / "items.npy", items)
        if int8_index:
            from fedrec.export.item_index import int8_scan_model

            (tmp / "items.int8.onnx").write_bytes(int8_scan_model(items.astype(np.float32)))
        write_json(tmp / "items.json", {"item_ids": catalog.item_ids, "titles": catalog.titles})
        parameters = sum(p.numel() for p in encoder.parameters())
        manifest = {
            "format_version": FORMAT_VERSION,
            "fedrec_version": fedrec.__version__,
            "source": str(checkpoint.resolve()),
            "model": {
                "kind": meta["kind"], "parameters": parameters, "dim": encoder.dim,
                "layers": encoder.encoder.config.num_hidden_layers, "hidden": encoder.encoder.config.hidden_size,
                "max_item_tokens": encoder.config.max_item_tokens,
                "max_context_tokens": encoder.config.max_context_tokens,
                "context_items": encoder.config.context_items,
                "onnx": onnx_files, "tokenizer": "tokenizer.json", "item_embeddings": "items.npy",
                "items": "items.json", "items_count": len(catalog),
                **({"tensorrt_engine": "encoder.fp16.plan"} if tensorrt else {}),
                **({"item_index": "items.int8.onnx"} if int8_index else {}),
            },
            "metrics": metrics or {},
            "privacy": {"regions": meta.get("privacy", {}),
                        "statement": "ε per region as recorded in the regions' ledgers; the student and this "
                                     "bundle are post-processing of the DP teacher on public inputs"
                                     if meta.get("privacy") else "no DP claim: the source model carries none"},
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        write_json(tmp / MANIFEST, manifest)
        verify_bundle(tmp)
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        with atomic_file(archive, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as bundle:
            bundle.add(out, arcname=out.name)
    return out
