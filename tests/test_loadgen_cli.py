"""``genserve loadgen`` refuses bad input with one ``loadgen: ...`` line.

Every refusal comes before anything is sent or written: numbers out of range,
unknown names, unreadable traces and run directories. In process, ``main``
must end in ``SystemExit`` with a one-line message: any other exception, or a
normal return, fails the test.
"""
from __future__ import annotations

import pytest

from genserve.loadgen.cli import main


def refusal(argv: list[str]) -> str:
    """The one line ``main(argv)`` exits with (no traceback: other exceptions propagate)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("loadgen: "), message  # exit status 1
    assert "\n" not in message and "Traceback" not in message
    return message


NOWHERE = ["--target", "127.0.0.1:9"]  # nothing listens on port 9 (the discard service)


@pytest.mark.parametrize("args,expected", [
    (["--timeout-s", "-1"], "--timeout-s must not be negative"),
    (["--concurrency", "-2"], "--concurrency must not be negative"),
    (["--warmup-requests", "-1"], "--warmup-requests must not be negative"),
    (["--warmup-s", "-1"], "--warmup-s must not be negative"),
    (["--drain-timeout-s", "0"], "--drain-timeout-s must be positive"),
    (["--scrape-interval-s", "0"], "--scrape-interval-s must be positive"),
    (["--slo-ms-image", "-5"], "--slo-ms-image must not be negative"),
    (["--slo-ms-video", "-5"], "--slo-ms-video must not be negative"),
    (["--slo-scale", "-1", "--profile", "reference-h100"], "--slo-scale must not be negative"),
    (["--num-requests", "-3"], "--num-requests must not be negative"),
    (["--duration-s", "-1"], "--duration-s must not be negative"),
    (["--rate", "nan"], "--rate must be a finite number"),
    (["--output-format", "bogus"], "--output-format must be one of"),
    (["--metrics-url", "garbage url"], "metrics URL 'garbage url'"),
    (["--metrics-url", "host:port"], "metrics URL 'host:port'"),
    (["--profile", "auto"], "--profile auto is for compare"),
    (["compare", "--policies", "fcfs", "--num-workers", "0"], "--num-workers must be at least 1"),
    (["compare", "--policies", "fcfs", "--sim-max-sp-degree", "3"], "must be 0 or a power of two"),
    (["compare", "--policies", "foo"], "--policies: unknown 'foo'; choose from genserve,"),
    (["compare", "--policies", "fcfs,fcfs"], "each policy or target name once"),
    (["compare", "--targets", "foo"], "--targets: expected NAME=HOST:PORT"),
    (["compare"], "give --policies and/or --targets"),
    (["compare", "--policies", "fcfs", "--metrics-url", "h:1"], "--metrics-url is for run"),
])
def test_bad_flags_are_one_line_before_anything_runs(args, expected, tmp_path):
    """Refused before the pre-flight call (its refusal would be another message)."""
    out = tmp_path / "out"
    count = [] if "--num-requests" in args else ["--num-requests", "1"]
    assert expected in refusal([*args, *count, *NOWHERE, "--no-progress", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("line,expected", [
    ("[1, 2]", "every line must be a JSON object"),
    ('{"arrival_s": 0, "task": "image", "width": -64, "height": 64}', "must be positive"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "slo_ms": -5}', "slo_ms must"),
    ('{"arrival_s": NaN, "task": "image", "width": 64, "height": 64}', "arrival_s must"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "num_inference_steps": -1}',
     "num_inference_steps must not be negative"),
])
def test_bad_trace_lines_are_one_line(line, expected, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "task": "image", "width": 64, "height": 64}\n' + line + "\n")
    message = refusal(["--trace", str(trace), *NOWHERE, "--no-progress", "--out", str(tmp_path / "out")])
    assert f"{trace}: " in message and expected in message
    assert "request 2" in message or "JSON object" in message


def test_summarize_without_a_run_directory(tmp_path):
    assert "no run in" in refusal(["summarize", "--out", str(tmp_path)])
    (tmp_path / "requests.jsonl").write_text("not json\n")
    assert "not a readable run directory" in refusal(["summarize", "--out", str(tmp_path)])
