"""GPU checks (issue 6), for a machine with an NVIDIA GPU, TensorRT and onnxruntime-gpu; a few
minutes. Builds a student bundle with the FP16 encoder and a TensorRT engine, then compares, against
ONNX Runtime on the CPU in FP32: ORT CUDA (FP32, FP16), ORT's TensorRT provider (FP16) and the
engine itself. For each: the smallest cosine to the CPU embeddings, and texts per second at batch
1, 8 and 64 (the engine's profile ends at 64). A path whose package is missing is reported as such,
not skipped silently. Writes bench/results/gpu.json.

    python bench/gpu_checks.py [STUDENT_CHECKPOINT]   (default: a small student distilled here)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import save, silos_dir, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.distill.distill import distill
from fedrec.edge_runtime import EdgeModel
from fedrec.evaluation.search import fragment_queries
from fedrec.export.bundle import export_bundle
from fedrec.model.teacher import Teacher

BATCHES = (1, 8, 64)


def texts_per_second(embed, batches: list) -> dict:
    out = {}
    for size in BATCHES:
        chunks = [b for b in batches if len(b[0]) == size]
        embed(*chunks[0])                                               # build / warm-up
        started = time.perf_counter()
        for chunk in chunks:
            embed(*chunk)
        out[str(size)] = sum(len(c[0]) for c in chunks) / (time.perf_counter() - started)
    return out


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to length one: the graphs end in [u, p, 1], compared by direction."""
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def main(student: str | None = None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks need an NVIDIA GPU")
    catalog = Catalog.load(silos_dir() / "catalog.parquet")
    work = Path(tempfile.mkdtemp(prefix="fedrec-gpu-"))
    if student is None:
        teacher = Teacher(FedrecConfig().model, catalog)
        checkpoint = teacher.save(work / "teacher")
        distill(teacher, checkpoint, FedrecConfig.from_flat({"distill.epochs": 2}), work / "student")
        student = str(work / "student")
    results: dict = {"gpu": torch.cuda.get_device_name(0)}
    try:
        bundle = export_bundle(student, catalog, work / "bundle", tensorrt=True)
        results["engine_bytes"] = (bundle / "query_encoder.fp16.plan").stat().st_size
    except Exception as exc:                                   # report it, then check what runs without it
        results["tensorrt_build"] = f"failed: {exc}"
        bundle = export_bundle(student, catalog, work / "bundle-fp16", fp16=True)

    cpu = EdgeModel(bundle, "fp32", "cpu", threads=8)
    texts = fragment_queries(catalog, 1024)[0]
    # every batch padded to the token limit: one shape per batch size, so one warm-up call builds
    # whatever a provider builds per shape, and the timed calls measure running only
    batches = [tuple(cpu.inputs(texts[i:i + size], cpu.max_query_tokens).values())
               for size in BATCHES for i in range(0, 512, size)]
    probe = batches[-1]
    reference = cpu.session.run(None, {"input_ids": probe[0], "attention_mask": probe[1]})[0]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)

    paths = {f"ORT {device} {precision}": (precision, device)
             for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16"), ("tensorrt", "fp16"))}
    for name, (precision, device) in paths.items():
        try:
            session = EdgeModel(bundle, precision, device, threads=8).session
        except Exception as exc:
            results[name] = f"unavailable: {exc}"
            continue
        embed = lambda ids, mask: unit(session.run(None, {"input_ids": ids, "attention_mask": mask})[0])  # noqa: E731
        results[name] = {"min_cosine_vs_cpu_fp32": float((embed(*probe) * reference).sum(1).min()),
                         "texts_per_second": texts_per_second(embed, batches)}
    if "engine_bytes" in results:
        from fedrec.export.tensorrt import Engine

        engine = Engine(bundle / "query_encoder.fp16.plan")
        results["TensorRT engine fp16"] = {
            "min_cosine_vs_cpu_fp32": float((unit(engine.embed(*probe)) * reference).sum(1).min()),
            "texts_per_second": texts_per_second(engine.embed, batches)}
    save("gpu", results)


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
