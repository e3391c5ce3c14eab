"""The Dockerfile cannot be built here (no Docker engine), so check by reading what would break
it: every package folder copied, the same torch pin as `make setup`, non-root user, health check
command that exists, port exposed, the run stage free of build inputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


def test_every_package_folder_and_the_readme_are_copied():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    copied = set(re.findall(r"^COPY (\S+) /src/\1$", DOCKERFILE, flags=re.M))
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"
    assert project["project"]["readme"] in re.search(r"^COPY (.+) /src/$", DOCKERFILE,
                                                     flags=re.M).group(1)


def test_torch_pin_matches_make_setup():
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, flags=re.M).group(1)
    assert f'pip install "{pin}"' in DOCKERFILE


def test_runtime_stage_is_lean_non_root_and_healthy():
    build, runtime = _stages()
    assert " AS build" in build.splitlines()[0] and " AS runtime" in runtime.splitlines()[0]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert not re.search(r"^COPY (?!--from)", runtime, flags=re.M)  # no sources at run time
    assert not re.search(r"apt-get|gcc|build-essential", DOCKERFILE)
    user = re.search(r"^USER (\S+)", runtime, flags=re.M)
    assert user and user.group(1) not in ("root", "0")
    assert runtime.index("USER ") < runtime.index("ENTRYPOINT")
    assert re.search(r"^EXPOSE 50051$", runtime, flags=re.M)
    assert '"--port", "50051"' in runtime and '"0.0.0.0"' in runtime
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD \[(.*)\]", runtime, flags=re.M)
    module = re.search(r'"-m", "([\w.]+)"', health.group(1)).group(1)
    assert importlib.util.find_spec(module) is not None
    assert "127.0.0.1:50051" in health.group(1)


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    needed = {"pyproject.toml", "README.md", "gradprobe", "diagnostics", "server", "client"}
    assert not needed & ignored


def test_cmd_flags_are_serve_flags_and_its_ports_are_exposed():
    from gradprobe.server.main import add_serve_arguments

    _, runtime = _stages()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, flags=re.M).group(1))
    assert cmd[0] == "serve"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args, unknown = parser.parse_known_args(cmd[1:])
    assert not unknown, f"gradprobe serve has no {unknown}"
    exposed = {int(port) for port in re.findall(r"^EXPOSE (\d+)$", runtime, flags=re.M)}
    assert args.metrics_port, "the image serves Prometheus metrics"
    assert {args.port, args.metrics_port} == exposed
