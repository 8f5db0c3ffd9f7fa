"""fedrec's contract with Flower: the public interfaces it relies on, checked so that a Flower
upgrade which breaks one fails here, loudly, naming the Flower version and the interface.

Static part: the public app APIs used by server_app, client_app and coordinator, and the
commands and flags of `flwr`, `flower-superlink` and `flower-supernode` that deployment.py uses
(read from their `--help`). Live part: one SuperLink on loopback (TLS, node authentication) and
a round trip of every `Control` method, which also checks the JSON fields Control reads."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from fedrec.errors import FedrecError
from fedrec.federation.certs import create_dev_pki, create_node_key
from fedrec.federation.deployment import BIN, Control, flower_env, free_port, start_superlink

FLOWER = version("flwr")

# what server_app.py, client_app.py and coordinator.py import, by public module
APP_NAMES = {
    "flwr.app": ["Array", "ArrayRecord", "ConfigRecord", "Context", "Message", "MessageType", "MetricRecord",
                 "RecordDict"],
    "flwr.serverapp": ["Grid", "ServerApp"],
    "flwr.clientapp": ["ClientApp"],
}

# every command line deployment.py runs, with the flags it passes
COMMAND_FLAGS = {
    ("flwr", "run"): ["--run-config", "--format"],
    ("flwr", "list"): ["--run-id", "--format"],
    ("flwr", "stop"): ["--format"],
    ("flwr", "log"): ["--stream"],
    ("flwr", "supernode", "register"): ["--name", "--format"],
    ("flwr", "supernode", "list"): ["--verbose", "--format"],
    ("flower-superlink",): ["--host", "--port", "--database", "--disable-runtime-dependency-installation",
                            "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--insecure",
                            "--enable-supernode-auth"],
    ("flower-supernode",): ["--superlink", "--host", "--port", "--node-config", "--root-certificates", "--insecure",
                            "--auth-supernode-private-key"],
}


def broken(interface: str, change: str) -> str:
    return f"Flower {FLOWER} broke fedrec's contract: {interface} {change}"


@pytest.mark.parametrize("module", sorted(APP_NAMES))
def test_public_app_names_are_importable(module):
    imported = importlib.import_module(module)
    missing = [name for name in APP_NAMES[module] if not hasattr(imported, name)]
    assert not missing, broken(module, f"no longer exports {missing}")


def public(name: str):
    """A public Flower name, imported here (not at the top) so that one that moved fails its
    test with the contract's message rather than the whole module with an ImportError."""
    module, _, attribute = name.rpartition(".")
    value = getattr(importlib.import_module(module), attribute, None)
    assert value is not None, broken(module, f"no longer exports {attribute}")
    return value


def parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_app_signatures_fedrec_calls():
    Message, Grid, ServerApp, ClientApp = map(public, ["flwr.app.Message", "flwr.serverapp.Grid",
                                                       "flwr.serverapp.ServerApp", "flwr.clientapp.ClientApp"])
    wanted = {
        "flwr.app.Message(...)": (Message.__init__, {"dst_node_id", "message_type", "group_id", "reply_to"}),
        "flwr.serverapp.Grid.send_and_receive": (Grid.send_and_receive, {"messages", "timeout"}),
        "flwr.serverapp.Grid.get_node_ids": (Grid.get_node_ids, {"self"}),
        "flwr.serverapp.ServerApp.main": (ServerApp.main, {"self"}),
    }
    wanted.update({f"flwr.clientapp.ClientApp.{action}": (getattr(ClientApp, action, None), {"self"})
                   for action in ("train", "evaluate", "query")})
    for interface, (function, names) in wanted.items():
        assert callable(function), broken(interface, "is gone")
        assert names <= parameters(function), broken(interface, f"lost parameters {sorted(names - parameters(function))}")


def test_records_behave_as_fedrec_uses_them():
    """What coordinator.py and client_app.py do with records, done here."""
    Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict = map(
        public, [f"flwr.app.{name}" for name in ("Array", "ArrayRecord", "ConfigRecord", "Context", "Error", "Message",
                                                 "MessageType", "Metadata", "MetricRecord", "RecordDict")])
    assert (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY) == ("train", "evaluate", "query"), \
        broken("flwr.app.MessageType", "renamed the message types fedrec sends as plain strings")
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    arrays = ArrayRecord({"lora.A": Array(np.ascontiguousarray(weights))})
    restored = {k: v.numpy() for k, v in arrays.items()}
    assert np.array_equal(restored["lora.A"], weights) and restored["lora.A"].dtype == np.float32, \
        broken("flwr.app.Array/ArrayRecord", "no longer round-trips a numpy array")

    config = RecordDict({"config": ConfigRecord({"round": 2, "run": "r"}), "arrays": arrays})
    assert int(config["config"]["round"]) == 2 and config["config"]["run"] == "r", \
        broken("flwr.app.RecordDict/ConfigRecord", "no longer read back as mappings")
    # a Message can only be built inside a running app (Flower 1.42 needs the task's identity),
    # so what fedrec reads from one is checked on the classes
    assert {"content", "metadata", "has_error", "error"} <= set(dir(Message)), \
        broken("flwr.app.Message", "lost content/metadata/has_error/error")
    assert {"message_id", "dst_node_id", "reply_to_message_id"} <= set(dir(Metadata)), \
        broken("flwr.app.Metadata", "lost message_id/dst_node_id/reply_to_message_id")
    assert {"code", "reason"} <= set(dir(Error)), broken("flwr.app.Error", "lost code/reason")
    reply = RecordDict({"metrics": MetricRecord({"loss": 0.5}), "info": ConfigRecord({"region": "eu"})})
    assert dict(reply["metrics"]) == {"loss": 0.5} and reply["info"]["region"] == "eu", \
        broken("flwr.app.MetricRecord", "no longer reads back as a mapping")
    assert {"run_config", "node_config"} <= parameters(Context.__init__), \
        broken("flwr.app.Context", "lost run_config/node_config")


@pytest.fixture(scope="module")
def help_texts() -> dict[tuple[str, ...], str]:
    """Each command's `--help`, all at once (each is a Python start-up), wide enough not to wrap."""
    env = {**flower_env(Path.cwd()), "COLUMNS": "400", "TERM": "dumb"}

    def help_of(command: tuple[str, ...]) -> str:
        done = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True,
                              env=env, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, broken(" ".join(command), f"--help fails: {done.stderr[-500:]}")
        return done.stdout + done.stderr

    with ThreadPoolExecutor(len(COMMAND_FLAGS)) as pool:
        return dict(zip(COMMAND_FLAGS, pool.map(help_of, COMMAND_FLAGS)))


def option_flags(help_text: str) -> set[str]:
    """The long flags a `--help` lists as options: the leading flags of each line (inside rich's
    box or not), so prose that merely mentions a flag does not count."""
    flags = set()
    for line in help_text.splitlines():
        for token in line.strip(" │|").split():
            if not token.startswith("-"):
                break
            flags.update(word.rstrip(",") for word in token.split("/") if word.startswith("--"))
    return flags


@pytest.mark.parametrize("command", list(COMMAND_FLAGS), ids=" ".join)
def test_commands_take_the_flags_fedrec_passes(help_texts, command):
    missing = sorted(set(COMMAND_FLAGS[command]) - option_flags(help_texts[command]))
    assert not missing, broken(f"`{' '.join(command)}`", f"no longer takes {missing}")


def test_run_config_accepts_a_toml_file(help_texts):
    """Control.submit passes the run config as a TOML file, so values need no shell quoting."""
    assert "toml" in help_texts[("flwr", "run")].lower(), broken("`flwr run --run-config`", "no longer takes a TOML file")


def wait_for_finish(control: Control, run_id: int, timeout: float) -> tuple[str, str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = control.status(run_id)
        if status[0] == "finished":
            return status
        time.sleep(1.0)
    raise AssertionError(f"run {run_id} did not finish within {timeout:.0f}s: {status}")


@pytest.mark.xdist_group("flower")
def test_every_control_method_round_trips_on_a_real_superlink(tmp_path, monkeypatch):
    """Submit a run whose config holds spaces, both quote kinds, a non-ASCII path and an inexact
    float; the ServerApp records the config it received (then stops: no catalog), so what
    arrived is compared with what was sent. Node registration needs TLS and node auth."""
    homes = tmp_path / "tmp"          # where Control's throwaway FLWR_HOMEs go
    homes.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(homes))
    pki = create_dev_pki(tmp_path / "certs")
    address = f"127.0.0.1:{free_port()}"
    superlink = start_superlink(address, tmp_path / "superlink", pki, auth=True)
    control = Control(address, pki.ca)
    run_dir = tmp_path / "run dir 'single' \"double\" ü"
    sent = {"federation.run_dir": str(run_dir), "federation.catalog": "",
            "model.encoder": "/models/an encoder = 'x' \"y\" #not-a-comment",
            "federation.proximal_mu": 0.1 + 0.2, "train.epochs": 7, "model.item_ids": False}
    try:
        run_id = control.submit(sent)
        assert run_id > 0
        _, public_key = create_node_key(tmp_path / "keys", "region-a")
        node_id = control.register_node(public_key, name="region-a")
        assert control.nodes().get(node_id) == "registered", broken("`flwr supernode list`", "lost the registered node")

        status, sub_status, details = wait_for_finish(control, run_id, 240)
        assert (status, sub_status) == ("finished", "failed"), (status, sub_status, details)
        received = json.loads((run_dir / "config.json").read_text())
        assert {key: received[key] for key in sent} == sent, broken("`flwr run --run-config FILE.toml`",
                                                                   "changed run config values on the way")
        assert "federation.catalog is not set" in control.logs(run_id, timeout=60), \
            broken("`flwr log --stream`", "no longer returns the ServerApp's log")
        assert control.stop(run_id) is False        # already finished
        with pytest.raises(FedrecError, match=r"`flwr list` failed .*not found"):
            control.status(run_id + 1)
    finally:
        control.close()
        superlink.stop()
    assert not list(homes.iterdir()), "Control left a FLWR_HOME behind"
