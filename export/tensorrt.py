"""TensorRT engine from the float16 ONNX encoder (GPU only; the `tensorrt` extra).

The network is strongly typed: TensorRT keeps the precision written in the graph (float16 compute,
float32 inputs and outputs) instead of choosing kernels by builder flags. That is the only mode
TensorRT 11 has, and TensorRT 10 gets it through the STRONGLY_TYPED creation flag, so one build
serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedrec.errors import FedrecError


def build_engine(onnx_path: Path, engine_path: Path, max_tokens: int, max_batch: int = 64) -> None:
    """Optimisation profile: batch 1..max_batch, tokens 1..max_tokens, tuned for 8 × max_tokens/2."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FedrecError("TensorRT is not installed", hint="pip install 'fedrec[tensorrt]' on a machine with an NVIDIA GPU") from exc
    if not torch.cuda.is_available():
        raise FedrecError("TensorRT needs an NVIDIA GPU and none is visible", hint="Export without --tensorrt here.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FedrecError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (8, max(1, max_tokens // 2)), (max_batch, max_tokens))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise FedrecError(f"TensorRT failed to build an engine from {onnx_path}", hint="Its log above says why.")
    engine_path.write_bytes(bytes(engine))


class Engine:
    """A built engine run with CUDA buffers from torch: how the GPU checks verify the engine itself
    against ONNX Runtime (serving goes through ONNX Runtime's providers instead)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise FedrecError(f"TensorRT cannot load the engine {engine_path}",
                              hint="An engine runs only with the TensorRT version and GPU it was built for; rebuild it here.")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.cuda.stream(self.stream):                    # copies and the engine on one stream
            on_gpu = {}
            for name, values in inputs.items():
                dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
                on_gpu[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype)).cuda()
                if not self.context.set_input_shape(name, tuple(on_gpu[name].shape)):
                    raise FedrecError(f"TensorRT engine: {name} shape {tuple(values.shape)} is outside its "
                                      f"optimisation profile {self.engine.get_tensor_profile_shape(name, 0)}")
                self.context.set_tensor_address(name, on_gpu[name].data_ptr())
            dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype("embedding")))).dtype
            output = torch.empty(tuple(self.context.get_tensor_shape("embedding")), dtype=dtype, device="cuda")
            self.context.set_tensor_address("embedding", output.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FedrecError("TensorRT failed to run the engine")
            result = output.cpu()                               # waits for the stream
        return result.numpy().astype(np.float32)
