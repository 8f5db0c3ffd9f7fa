"""GPU checks (issue 6), for a machine with an NVIDIA GPU, TensorRT and onnxruntime-gpu; about
five minutes. Builds a tiny student bundle with a TensorRT FP16 engine, then compares TensorRT
(through ONNX Runtime's TensorRT provider) with ORT CUDA and ORT CPU: parity of embeddings and
throughput at several batch sizes. Writes bench/results/gpu.json.

    python bench/gpu_checks.py [BUNDLE_OR_STUDENT]   (default: a tiny student made here)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from common import save, silos_dir
from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.distill.distill import distill
from fedrec.edge_runtime import EdgeModel
from fedrec.export.bundle import export_bundle
from fedrec.model.teacher import Teacher


def main(source: str | None = None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks need an NVIDIA GPU")
    catalog = Catalog.load(silos_dir() / "catalog.parquet")
    work = Path(tempfile.mkdtemp(prefix="fedrec-gpu-"))
    if source is None:
        teacher = Teacher(FedrecConfig().model)
        checkpoint = teacher.save(work / "teacher")
        source, _ = str(work / "student"), distill(teacher, checkpoint, catalog,
                                                   FedrecConfig.from_flat({"distill.epochs": 2}), work / "student")
    bundle = export_bundle(source, catalog, work / "bundle", tensorrt=True)
    texts = [catalog.context([i, (i * 7) % len(catalog)], "", 10) for i in range(512)]
    cpu = EdgeModel(bundle, "fp32", "cpu", threads=8)
    reference = cpu.embed(texts[:64])
    results = {}
    for device in ("cuda", "tensorrt"):
        model = EdgeModel(bundle, "fp32", device)
        cosine = (model.embed(texts[:64]) * reference).sum(1)
        throughput = {}
        for batch in (1, 32, 256):
            chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
            model.embed(chunks[0])
            started = time.perf_counter()
            for _ in range(3):
                for chunk in chunks:
                    model.embed(chunk)
            throughput[str(batch)] = 3 * len(texts) / (time.perf_counter() - started)
        results[device] = {"min_cosine_vs_cpu": float(cosine.min()), "texts_per_second": throughput}
    results["engine_bytes"] = (bundle / "encoder.fp16.plan").stat().st_size
    results["gpu"] = torch.cuda.get_device_name(0)
    save("gpu", results)


if __name__ == "__main__":
    main(*sys.argv[1:])
