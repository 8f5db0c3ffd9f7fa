"""The torch-free edge runtime: verifies a fedrec bundle and serves recommendations and search
with ONNX Runtime. Depends only on numpy, onnxruntime and tokenizers (plus the standard library).

Its names load on first use, so importing a light submodule (`messages`) does not start ONNX Runtime.
"""

from importlib import import_module

_HOMES = {"BundleError": "bundle", "open_bundle": "bundle", "verify_bundle": "bundle",
          "EdgeModel": "runtime", "Result": "runtime"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
