"""Running a real Flower deployment: SuperLink and SuperNode processes, and the control calls
(submit, status, stop, register) that `flwr` would make, from Python.

Every process gets an environment with telemetry, update checks and runtime dependency
installation off, so nothing contacts any address but the SuperLink.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.federation.certs import ServerTLS

APP_DIR = Path(__file__).resolve().parent / "fedrec-app"    # the Flower app: pyproject.toml only
BIN = Path(sys.executable).parent


def flower_env(home: str | Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",   # Flower starts its helpers by name
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """A Flower process in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0          # where this process's output starts in a log shared with earlier runs

    def text(self) -> str:
        """What this process has logged (not what an earlier process left in the same file)."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode(errors="replace")

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.text():
                return
            if self.popen.poll() is not None:
                raise FedrecError(f"{self.name} exited (code {self.popen.returncode}); "
                                  f"last log lines:\n{_tail(self.text())}")
            time.sleep(0.2)
        raise FedrecError(f"{self.name} not ready after {timeout:.0f}s; log {self.log}:\n{_tail(self.text())}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole group (Flower's helper processes too), escalate to SIGKILL."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, args: list[str], log_dir: Path, home: Path, env: dict[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as handle:
        offset = handle.tell()
        popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**flower_env(home), **(env or {})}, start_new_session=True)
    return Process(name, popen, log, offset)


def start_superlink(address: str, state_dir: Path, tls: ServerTLS | None, auth: bool = False,
                    timeout: float = 90.0) -> Process:
    """One HTTP port serves the regions, the control API and the ServerApp; state persists in SQLite."""
    host, port = split_address(address)
    args = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if tls:
        args += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    else:
        args += ["--insecure"]
    if auth:
        if not tls:
            raise FedrecError("SuperNode authentication needs TLS", hint="Drop --insecure or drop --auth.")
        args += ["--enable-supernode-auth"]
    process = spawn("superlink", args, state_dir / "logs", state_dir / "flwr-home")
    process.wait_for("Application startup complete", timeout)
    return process


def node_config_arg(values: dict) -> str:
    """Flower's `--node-config`: space-separated key=TOML-value pairs."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))
    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def start_supernode(name: str, superlink: str, node_config: dict, state_dir: Path,
                    root_cert: Path | None, auth_key: Path | None = None, port: int | None = None,
                    wait: bool = True, timeout: float = 90.0, env: dict[str, str] | None = None) -> Process:
    """A region's SuperNode; its node config (region, data, budget) is set here, on the region's side."""
    args = [str(BIN / "flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1",
            "--port", str(port or free_port()), "--node-config", node_config_arg(node_config)]
    args += ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    if auth_key:
        args += ["--auth-supernode-private-key", str(auth_key)]
    process = spawn(name, args, state_dir / "logs", state_dir / "flwr-home", env)
    if wait:
        process.wait_for("SuperNode ID:", timeout)
    return process


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedrecError(f"address {address!r} is not HOST:PORT")
    return host, int(port)


@dataclass
class Control:
    """The SuperLink's control API (what `flwr run/ls/stop/supernode register` use)."""

    address: str
    root_cert: Path | None = None
    _client: object = field(default=None, repr=False)

    def client(self):
        if self._client is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control.control_http_client import ControlHttpClient
            from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

            self._client = ControlHttpClient.from_server_address(
                server_address=self.address, insecure=self.root_cert is None,
                root_certificates=self.root_cert.read_bytes() if self.root_cert else None,
                interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def submit(self, run_config: dict, app_dir: Path = APP_DIR) -> int:
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab = build_fab_from_disk(app_dir)
        response = self.client().StartRun(StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(run_config), federation=""))
        if not response.HasField("run_id"):
            raise FedrecError(f"the SuperLink refused the run: {response}")
        return int(response.run_id)

    def status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub_status, details), e.g. ('finished', 'completed', '')."""
        from flwr.proto.control_pb2 import ListRunsRequest

        run = self.client().ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details

    def stop(self, run_id: int) -> bool:
        from flwr.proto.control_pb2 import StopRunRequest

        return bool(self.client().StopRun(StopRunRequest(run_id=run_id)).success)

    def logs(self, run_id: int, timeout: float = 10.0) -> str:
        import threading

        from flwr.proto.control_pb2 import StreamLogsRequest

        out: list[str] = []

        def pull():
            try:
                for part in self.client().StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                    out.append(part.log_output)
            except Exception:      # the stream ends with the run or with close()
                pass

        thread = threading.Thread(target=pull, daemon=True)
        thread.start()
        thread.join(timeout)
        return "".join(out)

    def nodes(self) -> dict[int, str]:
        """Every node the SuperLink knows, by id, with its status ("registered", "online", …)."""
        from flwr.proto.control_pb2 import ListNodesRequest

        return {n.node_id: n.status for n in self.client().ListNodes(ListNodesRequest()).nodes_info}

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        key = serialization.load_ssh_public_key(public_key.read_bytes())
        response = self.client().RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name))
        return int(response.node_id)
