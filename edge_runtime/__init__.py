"""The torch-free edge runtime: verifies a fedrec bundle and serves recommendations and search
with ONNX Runtime. Depends only on numpy, onnxruntime and tokenizers (plus the standard library).
"""

from fedrec.edge_runtime.bundle import BundleError, open_bundle, verify_bundle
from fedrec.edge_runtime.runtime import EdgeModel, Result

__all__ = ["BundleError", "EdgeModel", "Result", "open_bundle", "verify_bundle"]
