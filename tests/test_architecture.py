"""The one-way flow of packages (`.importlinter`), checked by import-linter on import names.

The repository keeps one folder per package (pyproject's package-dir maps `fedrec.data` to
`data/`); `fedrec/` holds a link to each, so a bare `lint-imports` in the repository sees every
module by its import name. The tests that plant a wrong import do it in a copy laid out the same
way, under a temporary folder, never in the repository.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = REPO / ".importlinter"


def packages() -> dict[str, Path]:
    """Import name → folder, as pyproject declares them."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def laid_out(root: Path) -> Path:
    """Every module linked under `root/fedrec/…` by its import name; returns `root`."""
    for name, folder in packages().items():
        target = root.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in folder.glob("*.py"):
            (target / module.name).symlink_to(module)
    return root


def lint(root: Path) -> subprocess.CompletedProcess:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint_imports), str(CONTRACTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}, timeout=120)


def test_the_package_layers_the_edge_runtime_and_acyclic_modules_hold():
    run = lint(REPO)               # what a bare `lint-imports` in the repository runs
    assert run.returncode == 0 and "4 kept, 0 broken" in run.stdout, run.stdout + run.stderr


def test_fedrec_links_every_package_folder():
    """The links are what let import-linter see a package; one missing would leave it unchecked."""
    for name, folder in packages().items():
        if name != "fedrec":
            link = REPO.joinpath(*name.split("."))
            assert link.is_symlink() and link.resolve() == folder.resolve(), name


def test_every_package_is_placed_in_the_contracts():
    """A new package outside the layers would be unchecked."""
    contracts = configparser.ConfigParser()
    contracts.read(CONTRACTS)
    layers = contracts["importlinter:contract:layers"]["layers"].replace(":", "\n").split()
    standalone = contracts["importlinter:contract:edge"]["source_modules"].split()
    named = set(layers) | set(standalone)
    assert {name for name in packages() if name != "fedrec"} <= named
    core = {f"fedrec.{module.stem}" for module in (REPO / "fedrec").glob("*.py") if module.stem != "__init__"}
    assert core <= named, f"modules of fedrec/ outside the layers: {sorted(core - named)}"


@pytest.mark.parametrize("module, imports, broken", [
    ("data/culprit", "from fedrec.training import trainer", "data flows one way"),
    ("data/culprit", "def later():\n    import fedrec.tools.cli\n", "data flows one way"),   # inside a function too
    ("edge_runtime/culprit", "import torch", "the edge runtime stands alone"),
    ("edge_runtime/culprit", "from fedrec.errors import FedrecError", "the edge runtime stands alone"),
    ("privacy/ledger", "from fedrec.privacy import audit", "no import cycles"),            # audit → ledger → here
    ("privacy/budget", "from fedrec.privacy.dp_sgd import train_private", "never loads the training loop"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, imports, broken):
    root = laid_out(tmp_path)
    target = root / "fedrec" / f"{module}.py"
    text = target.read_text() if target.is_symlink() else ""
    target.unlink(missing_ok=True)
    target.write_text(text + "\n" + imports + "\n")
    run = lint(root)
    assert run.returncode != 0 and f"{broken}" in run.stdout and "BROKEN" in run.stdout, run.stdout + run.stderr
