"""FP16 TensorRT engine from the ONNX encoder (GPU only; the `tensorrt` extra)."""

from __future__ import annotations

from pathlib import Path

from fedrec.errors import FedrecError


def build_engine(onnx_path: Path, engine_path: Path, max_tokens: int, max_batch: int = 64) -> None:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FedrecError("TensorRT is not installed", hint="pip install 'fedrec[tensorrt]' on a machine with an NVIDIA GPU") from exc
    import torch

    if not torch.cuda.is_available():
        raise FedrecError("TensorRT needs an NVIDIA GPU and none is visible", hint="Export without --tensorrt here.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise FedrecError(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (8, max_tokens // 2), (max_batch, max_tokens))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise FedrecError("TensorRT failed to build the engine")
    engine_path.write_bytes(bytes(engine))
