"""``genserve loadgen`` refuses bad input with one ``loadgen: ...`` line.

Every refusal comes before anything is sent or written: numbers out of range,
unknown names, unreadable traces and run directories, and servers that do not
answer the pre-flight ListModels call (or do not serve what the workload asks
for). In process, ``main`` must end in ``SystemExit`` with a one-line message:
any other exception, or a normal return, fails the test.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from genserve.loadgen.cli import main
from genserve.loadgen.launch import free_port
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

from conftest import fake_genserve

EV = pb.GenerateEvent.Type
IMAGE_FORMATS = [pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_JPEG, pb.OUTPUT_FORMAT_WEBP, pb.OUTPUT_FORMAT_RAW]


class ModelsOnly(pb_grpc.GenServeServicer):
    """Serves one image model; every request completes at once."""

    def __init__(self):
        self.num_generated = 0
        self.request_ids: list[str] = []

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name="tiny-image", task=pb.TASK_TEXT_TO_IMAGE, is_default=True, output_formats=IMAGE_FORMATS)])

    def GenerateStream(self, request, context):
        self.num_generated += 1
        self.request_ids.append(request.request_id)
        yield pb.GenerateEvent(request_id=request.request_id, type=EV.COMPLETED,
                               response=pb.GenerateResponse(request_id=request.request_id, slo_met=True))


@pytest.fixture(scope="module")
def image_server():
    servicer = ModelsOnly()
    with fake_genserve(servicer) as target:
        yield servicer, target


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
    (["--connect-timeout-s", "0"], "--connect-timeout-s must be positive"),
    (["--slo-ms-image", "-5"], "--slo-ms-image must not be negative"),
    (["--slo-ms-video", "-5"], "--slo-ms-video must not be negative"),
    (["--slo-ms-image", "0.4"], "--slo-ms-image must be 0 (the server's default) or at least 1 ms"),
    (["--slo-scale", "-1", "--profile", "reference-h100"], "--slo-scale must not be negative"),
    (["--num-requests", "-3"], "--num-requests must not be negative"),
    (["--duration-s", "-1"], "--duration-s must not be negative"),
    (["--rate", "nan"], "--rate must be a finite number"),
    (["--rate", "0"], "--rate must be positive"),
    (["--arrival", "gamma", "--cv", "0"], "--cv must be positive with gamma arrivals"),
    (["--image-fraction", "1.5"], "--image-fraction must be in [0, 1]"),
    (["--num-requests", "0"], "give --num-requests or --duration-s (or --trace)"),
    (["--output-format", "bogus"], "--output-format must be one of"),
    (["--metrics-url", "garbage url"], "metrics URL 'garbage url'"),
    (["--metrics-url", "host:port"], "metrics URL 'host:port'"),
    (["--profile", "auto"], "--profile auto is for compare"),
    (["compare", "--policies", "fcfs", "--num-workers", "0"], "--num-workers must be at least 1"),
    (["compare", "--policies", "fcfs", "--sim-max-sp-degree", "3"], "must be 0 or a power of two"),
    (["compare", "--policies", "foo"], "--policies: unknown 'foo'; choose from genserve,"),
    (["compare", "--policies", "fcfs,fcfs"], "each policy or target name once"),
    (["compare", "--targets", "foo"], "--targets: expected NAME=HOST:PORT"),
    (["--id-prefix", "x" * 100], "--id-prefix: at most 80 printable characters"),
    (["--id-prefix", "a\tb"], "--id-prefix: at most 80 printable characters"),
    (["compare"], "give --policies and/or --targets"),
    (["--num-requests", "3", "--warmup-requests", "3"], "--warmup-requests 3 leaves none of the workload's 3"),
    (["--num-requests", "3", "--rate", "1", "--warmup-s", "100"], "--warmup-s 100 leaves no request to measure"),
    (["compare", "--policies", "fcfs", "--metrics-url", "h:1"], "--metrics-url is for run"),
])
def test_bad_flags_are_one_line_before_anything_runs(args, expected, tmp_path):
    """Refused before the pre-flight call (its refusal would be another message)."""
    out = tmp_path / "out"
    count = [] if "--num-requests" in args else ["--num-requests", "1"]
    assert expected in refusal([*args, *count, *NOWHERE, "--no-progress", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("line,expected", [
    ("[1, 2]", "must be a JSON object"),
    ('{"arrival_s": 0, "task": "image", "width": -64, "height": 64}', "must be positive"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "slo_ms": -5}', "slo_ms must"),
    # sent as 0 (the server's default SLO) where simulate missed it: refused in both
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "slo_ms": 0.4}',
     "slo_ms must be 0 (the default SLO) or at least 1 ms"),
    ('{"arrival_s": NaN, "task": "image", "width": 64, "height": 64}', "arrival_s must"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "num_inference_steps": -1}',
     "num_inference_steps must not be negative"),
    ('{"arrival_s": 0, "task": "image", "width": 4294967296, "height": 64}', "must fit 32 bits"),
    # json reads these as inf, whose int() raised OverflowError
    ('{"arrival_s": 0, "task": "image", "width": Infinity, "height": 64}',
     "width must be a finite whole number, got inf"),
    ('{"arrival_s": 0, "task": "video", "width": 64, "height": 64, "num_frames": 1e999}',
     "num_frames must be a finite whole number, got inf"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "num_inference_steps": -Infinity}',
     "num_inference_steps must be a finite whole number, got -inf"),
    ("[" * 100_000, "nested too deeply"),  # json's parser raised RecursionError
    # int() truncated these silently
    ('{"arrival_s": 0, "task": "image", "width": 64.9, "height": 64}', "width must be a finite whole number, got 64.9"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": true}', "height must be a number, got true"),
    ('{"arrival_s": 1e300, "task": "image", "width": 64, "height": 64}', "arrival_s must be in 0..10000000 s"),
    ('{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "num_inference_steps": 4000000000}',
     "num_inference_steps must be at most 10000, got 4000000000"),
])
def test_bad_trace_lines_are_one_line(line, expected, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "task": "image", "width": 64, "height": 64}\n' + line + "\n")
    message = refusal(["--trace", str(trace), *NOWHERE, "--no-progress", "--out", str(tmp_path / "out")])
    assert f"{trace}:2: " in message and expected in message


def test_summarize_without_a_run_directory(tmp_path):
    assert "no run in" in refusal(["summarize", "--out", str(tmp_path)])
    for name in ("live-fcfs", "live-genserve"):  # a compare folder: its runs are one level down
        (tmp_path / name).mkdir()
        (tmp_path / name / "requests.jsonl").write_text("")
    assert "it holds the runs live-fcfs, live-genserve (a compare folder)" in refusal(
        ["summarize", "--out", str(tmp_path)])
    (tmp_path / "requests.jsonl").write_text("not json\n")
    assert "not a readable run directory" in refusal(["summarize", "--out", str(tmp_path)])


def test_nothing_listening_fails_fast_and_writes_nothing(tmp_path):
    """20 requests at 1/s would take 20 s to send: failing in well under that
    proves nothing was sent, and the pre-flight waited only --connect-timeout-s."""
    out = tmp_path / "out"
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    message = refusal(["--target", target, "--connect-timeout-s", "1", "--rate", "1",
                       "--num-requests", "20", "--no-progress", "--out", str(out)])
    assert time.monotonic() - started < 8.0
    assert message.startswith(f"loadgen: cannot reach the server at {target}: UNAVAILABLE: ")
    assert not out.exists()
    targets = f"a={target}"
    message = refusal(["compare", "--targets", targets, "--connect-timeout-s", "1", "--num-requests", "20",
                       "--out", str(out)])
    assert f"cannot reach the server at {target}" in message and not out.exists()


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    """The real command line: stderr is exactly the one line, the status 1."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "genserve", "loadgen", "--target", f"127.0.0.1:{free_port()}",
                           "--connect-timeout-s", "0.5", "--num-requests", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("loadgen: cannot reach")
    assert not out.exists()


def test_workload_the_server_cannot_serve_is_refused(image_server, tmp_path):
    servicer, target = image_server
    out = tmp_path / "out"
    base = ["--target", target, "--num-requests", "4", "--no-progress", "--out", str(out)]
    assert (f"{target} serves no video model for the workload (asked for: the default; it serves: "
            "tiny-image (image))") in refusal(base)
    assert "serves no image model for the workload (asked for: 'big';" in refusal(
        [*base, "--image-fraction", "1", "--image-model", "big"])
    assert "offers png|jpeg|webp|raw" in refusal([*base, "--image-fraction", "1", "--output-format", "mp4"])
    assert servicer.num_generated == 0 and not out.exists()
    main([*base, "--image-fraction", "1", "--rate", "100", "--no-plots"])  # a servable workload runs
    assert servicer.num_generated == 4 and (out / "requests.jsonl").exists()
    # A trace may hold requests the server refuses one by one: they are sent and recorded.
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "task": "image", "width": 64, "height": 64}\n'
                     '{"arrival_s": 0, "task": "image", "width": 64, "height": 64, "model": "big"}\n')
    main(["--target", target, "--trace", str(trace), "--no-progress", "--no-plots", "--out", str(out)])
    assert servicer.num_generated == 6
    # --image-model fills the trace's unset models, so the pre-flight check applies as without --trace
    assert "serves no image model for the workload (asked for: 'big';" in refusal(
        ["--target", target, "--trace", str(trace), "--image-model", "big", "--out", str(out)])
    assert servicer.num_generated == 6


def test_an_out_folder_that_cannot_be_made_is_one_line_before_the_run(image_server, tmp_path):
    servicer, target = image_server
    before = servicer.num_generated
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = ["--target", target, "--image-fraction", "1", "--num-requests", "3", "--no-progress"]
    assert refusal([*base, "--out", str(blocker / "out")]).startswith(
        f"loadgen: --out {blocker / 'out'}: cannot make the folder: ")
    assert servicer.num_generated == before


def test_metrics_url_must_answer_before_the_run(image_server, tmp_path):
    servicer, target = image_server
    before = servicer.num_generated
    message = refusal(["--target", target, "--image-fraction", "1", "--num-requests", "3", "--metrics-url",
                       f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "out")])
    assert "cannot scrape the metrics URL http://127.0.0.1:" in message
    assert servicer.num_generated == before and not (tmp_path / "out").exists()


def test_a_server_that_does_not_start_is_one_line(tmp_path):
    """compare --policies: the server's own error, and where its output went."""
    out = tmp_path / "out"
    message = refusal(["compare", "--policies", "fcfs", "--server-args=--no-such-flag",
                       "--num-requests", "1", "--no-progress", "--out", str(out)])
    assert "the server (fcfs) exited with status 2 before listening: " in message
    assert "unrecognized arguments: --no-such-flag" in message
    assert (out / "live-fcfs" / "server.log").read_text().strip()
    from genserve.loadgen.launch import ServerStartError

    err = ServerStartError("fcfs", "", None, 5.0)
    assert err.line == "the server (fcfs) was not listening after 5 s (no output)"


def test_runs_send_their_own_ids_and_id_prefix_sets_them(image_server, tmp_path):
    """Two runs (same seed) sent the same ids lg-000000...; --id-prefix did not
    exist. compare's runs each get their own ids too, even on one server."""
    import json

    servicer, target = image_server
    base = ["--target", target, "--image-fraction", "1", "--num-requests", "2", "--rate", "100",
            "--no-progress", "--no-plots"]
    sent = []
    for run in ("a", "b"):
        before = len(servicer.request_ids)
        main([*base, "--out", str(tmp_path / run)])
        sent.append(servicer.request_ids[before:])
        records = [json.loads(line) for line in (tmp_path / run / "requests.jsonl").read_text().splitlines()]
        assert sorted(r["req_id"] for r in records) == sorted(sent[-1])
    assert len(set(sent[0] + sent[1])) == 4
    main([*base, "--id-prefix", "exp7", "--out", str(tmp_path / "c")])
    assert sorted(servicer.request_ids[-2:]) == ["exp7-000000", "exp7-000001"]
    doc = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert doc["settings"]["run"]["id_prefix"] == "exp7"
    before = len(servicer.request_ids)
    main(["compare", "--targets", f"x={target},y={target}", "--image-fraction", "1", "--num-requests", "2",
          "--rate", "100", "--no-progress", "--no-plots", "--out", str(tmp_path / "cmp")])
    assert len(set(servicer.request_ids[before:])) == 4
    before = len(servicer.request_ids)
    main(["compare", "--targets", f"x={target},y={target}", "--image-fraction", "1", "--num-requests", "1",
          "--id-prefix", "exp8", "--no-progress", "--no-plots", "--out", str(tmp_path / "cmp2")])
    assert sorted(servicer.request_ids[before:]) == ["exp8-x-000000", "exp8-y-000000"]


def test_closed_loop_workload_jsonl_holds_the_send_times(image_server, tmp_path):
    """workload.jsonl of a closed loop held the unused Poisson plan at --rate
    (1/s: 6 requests over ~6 s) instead of the requests as sent (~all at once)."""
    import json

    from genserve.scheduler.workload import read_trace

    servicer, target = image_server
    out = tmp_path / "closed"
    main(["--target", target, "--image-fraction", "1", "--concurrency", "2", "--num-requests", "6",
          "--no-progress", "--no-plots", "--out", str(out)])
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    trace = read_trace(out / "workload.jsonl")
    assert [t.arrival_s for t in trace] == [round(r["send_s"], 6) for r in records]
    assert trace[-1].arrival_s < 1.0
    replay = tmp_path / "replay"  # replayable: open loop at those times
    main(["--target", target, "--trace", str(out / "workload.jsonl"), "--no-progress", "--no-plots",
          "--out", str(replay)])
    again = [json.loads(line) for line in (replay / "requests.jsonl").read_text().splitlines()]
    assert [r["intended_s"] for r in again] == [t.arrival_s for t in trace]
    assert read_trace(replay / "workload.jsonl") == trace


def test_compare_no_plots_writes_no_png(image_server, tmp_path):
    servicer, target = image_server
    flags = ["compare", "--targets", f"x={target}", "--image-fraction", "1", "--num-requests", "2",
             "--rate", "100", "--no-progress"]
    main([*flags, "--no-plots", "--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "compare.json").exists() and (tmp_path / "a" / "live-x" / "summary.json").exists()
    assert not list((tmp_path / "a").rglob("*.png"))
    main([*flags, "--out", str(tmp_path / "b")])
    assert {p.name for p in (tmp_path / "b").rglob("*.png")} == {
        "compare.png", "latency_cdf.png", "attainment_over_time.png"}


def test_compare_notes_a_target_it_cannot_simulate(image_server, tmp_path, capsys):
    """With --profile, a target not named after a policy was silently left
    out of the simulation (its sim columns "-")."""
    servicer, target = image_server
    main(["compare", "--targets", f"mine={target}", "--profile", "reference-h100", "--image-fraction", "1",
          "--num-requests", "1", "--no-progress", "--no-plots", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "loadgen: note: target 'mine' is not a policy name" in err and "not simulated" in err
    main(["compare", "--targets", f"mine={target}", "--image-fraction", "1", "--num-requests", "1",
          "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert "note" not in capsys.readouterr().err  # no profile: nothing is simulated, nothing to say
