"""`fedrec-edge BUNDLE`: serve a bundle where only `fedrec[edge]` is installed (no torch, pandas
or typer). `fedrec serve` is the same server inside the full tool; both go through `serve_bundle`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from functools import partial
from pathlib import Path

from fedrec.edge_runtime.bundle import BundleError
from fedrec.edge_runtime.messages import print_messages
from fedrec.edge_runtime.runtime import EdgeModel
from fedrec.edge_runtime.server import serve

log = logging.getLogger("fedrec.edge_runtime.cli")       # by name: run with `python -m`, __name__ is __main__


class ServeError(Exception):
    """The server cannot start; the message says why and what to do."""


def serve_bundle(bundle: str | Path, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
                 precision: str = "int8", device: str = "cpu") -> None:
    """Serve `bundle` until interrupted, saying when every worker is ready and when it stops.
    Raises BundleError for a bundle that cannot be served, ServeError for an address that
    cannot be listened on."""

    def ready(address: tuple[str, int]) -> None:
        log.info(f"serving {bundle} on http://{address[0]}:{address[1]} with {workers} "
                 f"worker{'s' * (workers > 1)} (Ctrl-C to stop)")

    try:
        serve(partial(EdgeModel, bundle, precision, device), host, port, workers, ready)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from exc
    except KeyboardInterrupt:
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrec-edge", description="Serve a fedrec bundle over HTTP JSON: "
                                     "GET /health, POST /recommend, /search, /similar.")
    parser.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1, choices=range(1, 65), metavar="1..64",
                        help="server processes on the one port (one Python process uses about one core)")
    parser.add_argument("--precision", default="int8", help="int8 or fp32; fp16 for bundles exported with it")
    parser.add_argument("--device", default="cpu", help="cpu; cuda or tensorrt with onnxruntime-gpu")
    args = parser.parse_args(argv)
    print_messages()
    try:
        serve_bundle(args.bundle, args.host, args.port, args.workers, args.precision, args.device)
    except (BundleError, ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":          # not when a serving worker process imports this module
    sys.exit(main())
