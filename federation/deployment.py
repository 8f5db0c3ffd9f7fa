"""Running a real Flower deployment: SuperLink and SuperNode processes, and the control calls
(submit, status, stop, logs, nodes, register) made through Flower's public `flwr` CLI.

Every process gets an environment with telemetry, update checks and runtime dependency
installation off, so nothing contacts any address but the SuperLink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import tomli_w

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


CONNECTION = "fedrec"       # the SuperLink connection's name in each command's private config.toml


@dataclass
class Control:
    """The SuperLink's control API, driven through Flower's public `flwr` CLI (`run`, `list`,
    `stop`, `log`, `supernode register/list`), so fedrec depends on no Flower internals.

    Each command runs in a fresh private FLWR_HOME whose `config.toml` names this SuperLink as
    the connection `fedrec`; nothing is held between calls. Replies are read from `--format json`.
    """

    address: str
    root_cert: Path | None = None
    timeout: float = 60.0     # per command; a SuperLink that does not answer in this is an error

    def close(self) -> None:
        """Nothing to release: every command carries its own connection."""

    def submit(self, run_config: dict, app_dir: Path = APP_DIR) -> int:
        """Start the app in `app_dir` with `run_config` (flat str/int/float/bool values) overriding
        its defaults. The overrides travel as a TOML file, so any string or float arrives exactly."""
        with self._home() as home:
            overrides = home / "run-config.toml"
            overrides.write_text(tomli_w.dumps(run_config))
            reply = self._flwr(home, "run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", str(overrides))
        return int(_field(reply, "flwr run", "run-id"))

    def status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub_status, details), e.g. ('finished', 'completed', '')."""
        with self._home() as home:
            reply = self._flwr(home, "list", CONNECTION, "--run-id", str(run_id))
        status, _, sub_status = _field(reply, "flwr list", "runs", 0, "status").partition(":")  # "finished:completed"
        details = _field(reply, "flwr list", "runs", 0, "status-details")
        return status, sub_status, "" if details == "N/A" else details

    def stop(self, run_id: int) -> bool:
        """Whether the SuperLink stopped the run (False for one already finished or unknown)."""
        with self._home() as home:
            return bool(self._flwr(home, "stop", str(run_id), CONNECTION, check=False).get("success"))

    def logs(self, run_id: int, timeout: float = 10.0) -> str:
        """The run's log so far: streamed until the run ends or `timeout` seconds pass."""
        with self._home() as home:
            try:
                done = _run_flwr(home, ["log", str(run_id), CONNECTION, "--stream"], timeout)
            except subprocess.TimeoutExpired as expired:    # a running run: what it logged until now
                return _text(expired.stdout)
        if done.returncode != 0:
            raise FedrecError(f"`flwr log {run_id}` failed (SuperLink {self.address}): {_message(done)}")
        return done.stdout

    def nodes(self) -> dict[int, str]:
        """Every node the SuperLink knows, by id, with its status ("registered", "online", …)."""
        with self._home() as home:
            reply = self._flwr(home, "supernode", "list", CONNECTION, "--verbose")
        return {int(_field(node, "flwr supernode list", "node-id")): _field(node, "flwr supernode list", "status")
                for node in _field(reply, "flwr supernode list", "nodes")}

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        with self._home() as home:
            reply = self._flwr(home, "supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                               *(["--name", name] if name else []))
        return int(_field(reply, "flwr supernode register", "node-id"))

    @contextmanager
    def _home(self) -> Iterator[Path]:
        """A throwaway FLWR_HOME whose config.toml holds only the connection to this SuperLink."""
        connection: dict[str, str | bool] = {"address": self.address}
        if self.root_cert:
            connection["root-certificates"] = str(Path(self.root_cert).resolve())
        else:
            connection["insecure"] = True
        with tempfile.TemporaryDirectory(prefix="fedrec-flwr-") as home:
            (Path(home) / "config.toml").write_text(
                tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
            yield Path(home)

    def _flwr(self, home: Path, *args: str, check: bool = True) -> dict:
        """One `flwr ... --format json` command; its JSON reply. With `check`, a reply that is not
        a success raises FedrecError carrying Flower's own message."""
        what = f"`flwr {' '.join(args[:2] if args[0] == 'supernode' else args[:1])}`"
        try:
            done = _run_flwr(home, [*args, "--format", "json"], self.timeout)
        except subprocess.TimeoutExpired:
            raise FedrecError(f"{what} got no answer from the SuperLink at {self.address} "
                              f"within {self.timeout:.0f}s") from None
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise FedrecError(f"{what} failed (SuperLink {self.address}, exit code {done.returncode}): "
                              f"{_message(done)}")
        if check and (done.returncode != 0 or not reply.get("success")):
            raise FedrecError(f"{what} failed (SuperLink {self.address}): "
                              f"{_flower_error(str(reply.get('error-message', done.stdout)))}")
        return reply


def _run_flwr(home: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The `flwr` CLI with `home` as its FLWR_HOME and working folder (so no pyproject.toml
    around the caller is taken for an app)."""
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, cwd=home,
                          env=flower_env(home), stdin=subprocess.DEVNULL, timeout=timeout)


def _field(reply, command: str, *path: str | int):
    """`reply[path[0]][path[1]]...`, or an error naming the Flower version and the field that
    changed: the JSON fields read here are part of fedrec's contract with Flower's CLI."""
    value = reply
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise FedrecError(f"Flower {version('flwr')}: the JSON of `{command} --format json` has no "
                              f"{'/'.join(map(str, path))!r} (reply: {json.dumps(reply)[:500]}); "
                              "fedrec.federation.deployment.Control needs updating for this Flower") from None
    return value


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _flower_error(message: str) -> str:
    """Flower's JSON error message on one line, without the progress lines it captured before it."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(("Using SuperLink:", "Displaying ")))


def _message(done: subprocess.CompletedProcess) -> str:
    """What a failed command said: its error output, else its standard output."""
    return (done.stderr.strip() or done.stdout.strip() or "no output")[-2000:]
