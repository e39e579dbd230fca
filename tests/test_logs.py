"""--log-format json: every log line of the server and its workers is one JSON object."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from genserve import logs

EMIT = """
import logging, sys, warnings
from genserve import logs
logs.configure(logging.INFO, sys.argv[1], sys.argv[2])
logging.getLogger("genserve.engine").info("worker %d is back", 1)
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("genserve.engine").exception("step failed")
warnings.warn("a library's warning")
from diffusers.utils import logging as dlog
dlog.get_logger("diffusers.pipelines").warning("a diffusers warning")
"""


def _emit(fmt: str, process: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", EMIT, fmt, process], capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stderr.splitlines()


def test_json_lines_carry_level_logger_process_and_traceback():
    lines = _emit("json", "worker3")
    records = [json.loads(line) for line in lines]  # every line an object (diffusers' too)
    by_message = {r["message"].splitlines()[-1] if r["logger"] == "py.warnings" else r["message"]: r
                  for r in records}
    back = by_message["worker 1 is back"]
    assert back["level"] == "INFO" and back["logger"] == "genserve.engine" and back["process"] == "worker3"
    assert back["time"].endswith("Z") and len(back["time"]) == len("2026-12-01T01:02:03.456Z")
    failed = by_message["step failed"]
    assert failed["level"] == "ERROR" and "ZeroDivisionError" in failed["exception"]
    assert "a library's warning" in "".join(r["message"] for r in records if r["logger"] == "py.warnings")
    diffusers = by_message["a diffusers warning"]
    assert diffusers["logger"] == "diffusers.pipelines" and diffusers["process"] == "worker3"


def test_text_lines_stay_as_they_were():
    lines = _emit("text", "worker3")
    assert any(line.endswith("worker3 INFO worker 1 is back") for line in lines)
    assert any("Traceback" in line for line in lines)
    with pytest.raises(ValueError, match="one of text, json"):
        logs.configure(20, "yaml")


@pytest.mark.timeout(240)
def test_a_server_with_json_logs_writes_only_json_on_stderr():
    from conftest import ServerProcess, wait_for

    from genserve.client import Client

    srv = ServerProcess("--num-workers", "2", "--log-format", "json")
    try:
        with Client(srv.target) as c:
            assert c.generate("a json log", task="image", steps=2).media.data
    finally:
        assert srv.stop() == 0
    assert wait_for(lambda: any('"stopped"' in line for line in srv.lines), 10)  # read to the end
    records, other = [], []
    for line in srv.lines:  # stdout and stderr together: stdout has the one "listening" line
        try:
            records.append(json.loads(line))
        except ValueError:
            other.append(line)
    assert len(other) == 1 and other[0].startswith("GenServe listening on"), other
    assert {r["process"] for r in records} == {"server", "worker0", "worker1"}
    assert any(r["message"] == "stopped" for r in records)
