"""Packaging: the agent extra stays free of TensorFlow and numpy, and the CLI lists every group."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
HEAVY = {
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "numpy",
    "ai-edge-litert",
    "tflite-runtime",
    "celery",
    "scikit-learn",
}
GROUPS = {"agent", "edge", "cloud", "fleet", "model", "rollout", "command", "admin", "demo", "bench", "tail"}


def resolve(requirements: list[str], extras: set[str], *, project: str = "edgefleet") -> set[str]:
    """Names of the distributions installing ``project[extras]`` asks for, following the project's
    self-referencing extras (``edgefleet[agent]`` inside ``edge``) transitively."""
    names: set[str] = set()
    done: set[str] = set()
    todo = {""} | extras  # "" = the base dependencies
    while todo:
        extra = todo.pop()
        done.add(extra)
        for line in requirements:
            req = Requirement(line)
            if req.marker is not None:
                if not req.marker.evaluate({"extra": extra}):
                    continue
                if extra == "" and "extra" in str(req.marker):
                    continue
            elif extra != "":
                continue  # base dependencies were taken with extra ""
            if canonicalize_name(req.name) == project:
                todo |= set(req.extras) - done
            else:
                names.add(canonicalize_name(req.name))
    return names


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        for req in reqs:
            marker = f'extra == "{extra}"'
            lines.append(f"{req} and {marker}" if ";" in req else f"{req}; {marker}")
    return [_parenthesise(line) for line in lines]


def _parenthesise(line: str) -> str:
    """``a; x or y and extra == "e"`` -> ``a; (x or y) and extra == "e"`` (keep the extra binding)."""
    if ";" not in line or " and extra == " not in line:
        return line
    req, marker = line.split(";", 1)
    condition, extra = marker.rsplit(" and extra == ", 1)
    return f"{req}; ({condition.strip()}) and extra == {extra}"


@pytest.mark.parametrize("source", ["pyproject.toml", "installed metadata"])
def test_agent_extra_installs_no_tensorflow_or_numpy(source):
    if source == "pyproject.toml":
        requirements = pyproject_requirements()
    else:
        requirements = importlib.metadata.requires("edgefleet") or []
    agent = resolve(requirements, {"agent"})
    assert {"paho-mqtt", "pydantic", "pydantic-settings", "click", "psutil"} <= agent
    assert not agent & HEAVY, f"the agent extra pulls {sorted(agent & HEAVY)}"
    # The resolver really follows self-references: the cloud extra does pull TensorFlow in.
    cloud = resolve(requirements, {"cloud"})
    assert {"tensorflow", "numpy", "psutil"} <= cloud
    assert {"tensorflow", "amqtt"} <= resolve(requirements, {"all"})
    assert "tensorflow" not in resolve(requirements, {"edge"})


def test_importing_the_shared_contract_and_cli_loads_no_heavy_package():
    code = (
        "import json, sys\n"
        "import shared, shared.cli, shared.tail, shared.codec, shared.schemas, shared.mqtt, shared.topics\n"
        "import shared.settings, shared.signing, shared.bench\n"
        "heavy = ('tensorflow', 'keras', 'numpy', 'ai_edge_litert', 'celery', 'sqlalchemy', 'cryptography')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []


def test_tail_help_runs_without_numpy():
    code = (
        "import sys\nsys.modules['numpy'] = None\n"
        "from shared.cli import main\nsys.argv = ['edgefleet', 'tail', '--help']\nmain()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--session" in proc.stdout


def test_help_lists_every_group_without_importing_tiers():
    code = (
        "import sys\nfrom shared.cli import main\nsys.argv = ['edgefleet', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "tiers = {'device_agent', 'edge_node', 'cloud'}\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & tiers))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    listed = set()
    in_commands = False
    for line in proc.stdout.splitlines():
        if line.startswith("Commands:"):
            in_commands = True
        elif in_commands and line.startswith("  ") and line.split():
            listed.add(line.split()[0])
    assert listed >= GROUPS
    assert "LOADED []" in proc.stdout


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"edgefleet": "shared.cli:main"}
    assert {
        ep.name for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "edgefleet"
    }
