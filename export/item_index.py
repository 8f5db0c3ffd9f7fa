"""Builds the int8 item scan that `edge_runtime.index.QuantizedIndex` runs with ONNX Runtime.

Each item vector is stored as int8 with its own scale; a uint8 query (zero point 128) is scored
against all of them by one MatMulInteger, rescaled, and the top `k` returned. ONNX Runtime packs
the int8 matrix once when the session loads.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from fedrec.edge_runtime.index import ZERO_POINT


def int8_scan_model(vectors: np.ndarray) -> bytes:
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = (np.maximum(np.abs(vectors).max(1), 1e-12) / 127).astype(np.float32)
    matrix = np.ascontiguousarray(np.round(vectors / scale[:, None]).astype(np.int8).T)     # dim × items
    dim = vectors.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["query", "items", "zero_point"], ["dots"]),
         helper.make_node("Cast", ["dots"], ["dots_float"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["dots_float", "item_scale"], ["scores"]),
         helper.make_node("TopK", ["scores", "k"], ["top_scores", "top_items"])],
        "int8_item_scan",
        [helper.make_tensor_value_info("query", TensorProto.UINT8, ["batch", dim]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
         helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", "k"])],
        initializer=[numpy_helper.from_array(matrix, "items"), numpy_helper.from_array(scale, "item_scale"),
                     numpy_helper.from_array(np.array(ZERO_POINT, dtype=np.uint8), "zero_point")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
