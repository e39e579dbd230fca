"""``genserve generate`` and the Python clients against a fake in-process server.

Every refusal is one line and a non-zero exit, with no traceback, and comes
before anything is sent: the fake servicer records every request it receives.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from genserve.cli import main
from genserve.client import AsyncClient, Client, build_request
from genserve.loadgen.launch import free_port
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

from conftest import fake_genserve

EV = pb.GenerateEvent.Type
F = pb.OutputFormat
MIME = {F.OUTPUT_FORMAT_UNSPECIFIED: "image/png", F.OUTPUT_FORMAT_PNG: "image/png",
        F.OUTPUT_FORMAT_JPEG: "image/jpeg", F.OUTPUT_FORMAT_WEBP: "image/webp", F.OUTPUT_FORMAT_MP4: "video/mp4",
        F.OUTPUT_FORMAT_GIF: "image/gif", F.OUTPUT_FORMAT_RAW: "application/octet-stream"}
BLOCK = "block"  # a prompt the fake server never finishes: it runs until the client goes away
FAIL, CANCEL = "fail", "cancel"  # prompts the fake server ends with FAILED / CANCELLED events
SLOW = "slow"  # STARTED, then a step every 0.15 s for 0.6 s, then COMPLETED


class Fake(pb_grpc.GenServeServicer):
    """Completes every request at once with media of the requested format
    (data: the format's name), except prompt ``BLOCK``: STARTED, then nothing
    until the call ends; ``cancelled`` is set when it ends that way."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.authorization: list[str | None] = []  # of each ListModels call

    def _response(self, request):
        return pb.GenerateResponse(
            request_id=request.request_id or "server-made-id", seed=request.seed,
            media=pb.Media(mime_type=MIME[request.output_format], width=64, height=64, num_frames=1,
                           data=F.Name(request.output_format).encode()))

    def GenerateStream(self, request, context):
        self.requests.append(request)
        if request.prompt == BLOCK:
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.STARTED)
            self.started.set()
            while context.is_active():
                time.sleep(0.02)
            self.cancelled.set()
            return
        if request.prompt == SLOW:
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.STARTED, sp_degree=1)
            for step in range(1, 5):
                time.sleep(0.15)
                yield pb.GenerateEvent(request_id=request.request_id, type=EV.STEP, step=step, num_steps=4)
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.COMPLETED,
                                   response=self._response(request))
            return
        if request.prompt in (FAIL, CANCEL):
            failed = request.prompt == FAIL
            if failed:  # a start first: the progress bar has something to draw
                yield pb.GenerateEvent(request_id=request.request_id, type=EV.STARTED, sp_degree=1)
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.FAILED if failed else EV.CANCELLED,
                                   status_code="INTERNAL" if failed else "",
                                   reason="worker 1 died twice" if failed else "")
            return
        yield pb.GenerateEvent(request_id=request.request_id, type=EV.COMPLETED, response=self._response(request))

    def Generate(self, request, context):
        self.requests.append(request)
        return self._response(request)

    def Cancel(self, request, context):
        return pb.CancelResponse(cancelled=False)

    def ListModels(self, request, context):
        self.authorization.append(dict(context.invocation_metadata()).get("authorization"))
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="tiny", task=pb.TASK_TEXT_TO_IMAGE, is_default=True)])


@pytest.fixture
def fake():
    servicer = Fake()
    with fake_genserve(servicer) as target:
        yield servicer, target


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh current directory, inside tmp_path (so escapes from it show)."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def generate(target, *args):
    main(["generate", "a cat", "--target", target, *args])


def refusal(target, *args, capsys) -> str:
    """The one error line ``genserve generate ARGS`` exits with (argparse's included)."""
    with pytest.raises(SystemExit) as exc:
        generate(target, *args)
    code = exc.value.code
    if isinstance(code, str):
        message = code
    else:  # argparse: usage, then "genserve generate: error: ..."; exit status 2
        assert code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in message and "\n" not in message and "Traceback" not in message, message
    return message


def test_format_jpg_is_jpeg_and_case_does_not_matter(fake, cwd):
    servicer, target = fake
    generate(target, "--format", "jpg", "--request-id", "a")
    generate(target, "--format", "JPEG", "--request-id", "b")
    generate(target, "--format", "Png", "--request-id", "c")
    assert [r.output_format for r in servicer.requests] == [F.OUTPUT_FORMAT_JPEG] * 2 + [F.OUTPUT_FORMAT_PNG]
    assert (cwd / "a.jpg").read_bytes() == b"OUTPUT_FORMAT_JPEG"
    assert (cwd / "c.png").read_bytes() == b"OUTPUT_FORMAT_PNG"


def test_unknown_format_is_refused_with_the_choices(fake, cwd, capsys):
    servicer, target = fake
    message = refusal(target, "--format", "bogus", capsys=capsys)
    assert "--format" in message and "bogus" in message and "jpeg" in message and "mp4" in message
    assert not servicer.requests


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**63), str(-2**63 - 1)])
def test_seed_out_of_int64_is_refused(fake, cwd, capsys, seed):
    servicer, target = fake
    message = refusal(target, "--seed", seed, capsys=capsys)
    assert message == f"error: --seed must be in {-2**63}..{2**63 - 1}, got {seed}"
    assert not servicer.requests


def test_seed_int64_extremes_are_sent(fake, cwd):
    servicer, target = fake
    generate(target, "--seed", str(2**63 - 1), "--request-id", "hi")
    generate(target, "--seed", str(-2**63), "--request-id", "lo")
    assert [r.seed for r in servicer.requests] == [2**63 - 1, -2**63]
    with pytest.raises(ValueError, match="seed must be in"):
        build_request("x", seed=2**63)


def test_output_folder_must_exist_before_anything_is_sent(fake, cwd, capsys):
    servicer, target = fake
    (cwd / "plain-file").write_text("")
    for output in ("/nonexistent/dir/x.png", "missing/x.png", "plain-file/x.png", "missing/"):
        message = refusal(target, "-o", output, capsys=capsys)
        assert message.startswith("error: ") and "-o" in message, message
    assert not servicer.requests
    assert sorted(os.listdir(cwd)) == ["plain-file"]


def test_output_may_be_an_existing_folder(fake, cwd, tmp_path):
    servicer, target = fake
    out = tmp_path / "out"
    out.mkdir()
    generate(target, "-o", str(out), "--request-id", "x1")
    generate(target, "-o", str(out) + os.sep, "--format", "gif", "--request-id", "x2")
    assert (out / "x1.png").read_bytes() == b"OUTPUT_FORMAT_UNSPECIFIED"
    assert (out / "x2.gif").read_bytes() == b"OUTPUT_FORMAT_GIF"


@pytest.mark.parametrize("request_id,name", [
    ("my/id", "my_id.png"), ("../escape", "___escape.png"), ("..", "__.png"), (".hidden", "_hidden.png"),
    ("a b\\c:d", "a_b_c_d.png"), ("ok-1.2_x", "ok-1.2_x.png"), ("/abs", "_abs.png"),
])
def test_default_name_is_a_safe_name_in_the_current_folder(fake, cwd, tmp_path, request_id, name):
    servicer, target = fake
    generate(target, "--request-id", request_id)
    assert servicer.requests[0].request_id == request_id  # the id itself is sent as given
    assert sorted(os.listdir(cwd)) == [name]
    assert sorted(os.listdir(tmp_path)) == ["cwd"]


def test_default_name_without_request_id_uses_the_servers_id(fake, cwd):
    servicer, target = fake
    generate(target)
    assert os.listdir(cwd) == ["server-made-id.png"]


@pytest.mark.parametrize("output,fmt,expected", [
    ("x.jpg", None, F.OUTPUT_FORMAT_JPEG), ("x.JPEG", None, F.OUTPUT_FORMAT_JPEG),
    ("x.webp", None, F.OUTPUT_FORMAT_WEBP), ("x.raw", None, F.OUTPUT_FORMAT_RAW),
    ("x.jpg", "jpeg", F.OUTPUT_FORMAT_JPEG), ("x.jpeg", "jpg", F.OUTPUT_FORMAT_JPEG),
    ("x.bin", None, F.OUTPUT_FORMAT_UNSPECIFIED), ("x", None, F.OUTPUT_FORMAT_UNSPECIFIED),
    ("x.bin", "webp", F.OUTPUT_FORMAT_WEBP),
])
def test_output_extension_picks_the_format(fake, cwd, output, fmt, expected):
    servicer, target = fake
    generate(target, "-o", output, *(("--format", fmt) if fmt else ()))
    assert servicer.requests[0].output_format == expected
    assert (cwd / output).read_bytes() == F.Name(expected).encode()


def test_output_extension_and_format_must_agree(fake, cwd, capsys):
    servicer, target = fake
    message = refusal(target, "-o", "x.jpg", "--format", "png", capsys=capsys)
    assert "x.jpg" in message and "png" in message and "--format" in message
    assert not servicer.requests and not os.listdir(cwd)


def test_ctrl_c_while_the_progress_bar_is_made_is_raised_once_it_is_whole():
    """A Ctrl-C inside tqdm's constructor left a half-made bar whose finaliser
    printed a traceback after "cancelled" (seen on a loaded machine)."""
    from genserve.client_cli import _held_interrupt

    before = signal.getsignal(signal.SIGINT)
    made = []

    def make():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler here, mid-construction
        made.append("whole")
        return "bar"

    with pytest.raises(KeyboardInterrupt):
        _held_interrupt(make)
    assert made == ["whole"]
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_prints_one_line_exits_130_and_cancels(fake, tmp_path):
    servicer, target = fake
    proc = subprocess.Popen([sys.executable, "-m", "genserve", "generate", BLOCK, "--target", target],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert servicer.started.wait(60), "the request never reached the server"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().splitlines()[-1] == "cancelled", err
    assert servicer.cancelled.wait(10), "the server-side call did not end"
    assert not os.listdir(tmp_path)


def test_progress_bar_waits_its_delay_and_ends_its_line(fake, cwd, capsys):
    """A bar drawn by refresh() ignored tqdm's delay and never ended its line,
    so the result (or "cancelled", or an error) was printed onto the bar."""
    _, target = fake
    with pytest.raises(SystemExit):  # STARTED, then FAILED at once: no bar, just the line
        main(["generate", FAIL, "--target", target, "-o", "x.png"])
    assert capsys.readouterr().err == ""  # (the exit message is SystemExit's code)
    main(["generate", SLOW, "--target", target, "-o", "slow.png"])
    captured = capsys.readouterr()
    assert "4/4" in captured.err and captured.err.endswith("\n"), repr(captured.err)
    assert captured.out.startswith("slow.png: ")


@pytest.mark.parametrize("prompt, line", [(FAIL, "error: INTERNAL: worker 1 died twice"),
                                          (CANCEL, "error: CANCELLED: cancelled")])
def test_a_request_the_server_ends_is_one_error_line_and_no_file(fake, cwd, prompt, line):
    _, target = fake
    with pytest.raises(SystemExit) as exc:
        main(["generate", prompt, "--target", target, "-o", "out.png"])
    assert exc.value.code == line
    assert not (cwd / "out.png").exists()


def test_client_accepts_num_inference_steps(fake):
    servicer, target = fake
    assert build_request("x", num_inference_steps=7).num_inference_steps == 7
    assert build_request("x", steps=7, num_inference_steps=7).num_inference_steps == 7
    assert not build_request("x").HasField("num_inference_steps")
    with pytest.raises(ValueError, match="num_inference_steps"):
        build_request("x", steps=3, num_inference_steps=7)
    with Client(target) as client:
        client.generate("x", num_inference_steps=5)
    assert servicer.requests[0].num_inference_steps == 5


def test_async_client_models_takes_timeout_and_wait_for_ready(fake):
    servicer, target = fake

    async def run():
        async with AsyncClient(target) as client:
            models = await client.models(timeout_s=10, wait_for_ready=True)
        assert [m.name for m in models] == ["tiny"]
        async with AsyncClient(f"127.0.0.1:{free_port()}") as client:  # nobody listens: waits, then the deadline
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as exc:
                await client.models(timeout_s=0.5, wait_for_ready=True)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 10

    asyncio.run(run())


def test_async_stream_left_early_cancels_the_call(fake):
    """``break`` then ``aclose()`` cancels the gRPC call (it stayed open: the
    request ran on, holding a per-client stream slot). Checked on the call:
    whether grpc's sync test server notices a cancel is not reliable (about
    1 in 10 times it does not within seconds, with the call done on the client)."""
    servicer, target = fake

    async def run():
        async with AsyncClient(target) as client:
            calls = []
            open_stream = client.stub.GenerateStream

            def recording(*args, **kwargs):
                calls.append(open_stream(*args, **kwargs))
                return calls[-1]

            client.stub.GenerateStream = recording
            events = client.stream(BLOCK, request_id="left-early")
            async for event in events:
                assert event.type == EV.STARTED and not calls[0].done()
                break
            await events.aclose()
            return calls[0].done() and await calls[0].code() == grpc.StatusCode.CANCELLED

    assert asyncio.run(run()), "the call is still open after aclose()"


def test_client_conveniences_match_the_cli(fake):
    servicer, target = fake
    assert build_request("x", output_format="JPG").output_format == pb.OUTPUT_FORMAT_JPEG
    with Client(target) as client:
        assert client.cancel("nothing", timeout_s=5) is False


# ---- tokens, channel options, waiting for the server --------------------------
def test_a_token_with_a_line_ending_is_sent_without_it(fake, monkeypatch, capsys):
    """GENSERVE_TOKEN="$(cat f)" of a CRLF file, or open(f).read(): every call
    failed on the client with INTERNAL: Invalid metadata, even to a server
    without auth (and loadgen blamed the server)."""
    servicer, target = fake
    with Client(target, token="s3cret\r\n") as client:
        client.models()

    async def run():
        async with AsyncClient(target, token=" s3cret\n") as client:
            await client.models()
    asyncio.run(run())
    monkeypatch.setenv("GENSERVE_TOKEN", "s3cret\r")
    main(["models", "--target", target])
    assert "tiny" in capsys.readouterr().out
    assert servicer.authorization == ["Bearer s3cret"] * 3
    with Client(target, token=" \r\n") as client:  # nothing left: no token at all
        client.models()
    assert servicer.authorization[-1] is None


@pytest.mark.parametrize("token, what", [("s3c\rret", "a control character (U+000D) at position 4"),
                                         ("s3cr\u00e9t", "a non-ASCII character at position 5")])
def test_a_token_grpc_cannot_send_is_refused_by_the_client(fake, tmp_path, token, what):
    from genserve.loadgen.cli import main as loadgen_main

    servicer, target = fake
    message = f"the token has {what}: a bearer token travels in gRPC metadata, which takes printable ASCII only"
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as err:
            make(target, token=token)
        assert str(err.value) == message  # the token itself is never shown
    for command in (["models"], ["generate", "a cat"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--target", target, "--token", token])
        assert exc.value.code == f"error: --token (or $GENSERVE_TOKEN): {message}"
    with pytest.raises(SystemExit) as exc:
        loadgen_main(["run", "--target", target, "--token", token, "--num-requests", "1",
                      "--out", str(tmp_path / "out")])
    assert exc.value.code == f"loadgen: --token (or $GENSERVE_TOKEN): {message}"
    assert servicer.requests == [] and servicer.authorization == []  # refused before anything was sent


def test_channel_options_reach_the_channel_constructors(monkeypatch):
    made = []
    for module in (grpc, grpc.aio):
        for name in ("insecure_channel", "secure_channel"):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *args, _make=original, _name=name: (
                made.append((_name, args[-1])) or _make(*args)))
    options = [("grpc.lb_policy_name", "round_robin"), ("grpc.keepalive_time_ms", 30_000),
               ("grpc.max_receive_message_length", 64 << 20)]  # replaces the client's own 512 MiB
    want = {"grpc.max_receive_message_length": 64 << 20, "grpc.lb_policy_name": "round_robin",
            "grpc.keepalive_time_ms": 30_000}
    Client("127.0.0.1:1", channel_options=options).close()
    Client("127.0.0.1:1", credentials=grpc.ssl_channel_credentials(), channel_options=options).close()

    async def run():
        async with AsyncClient("127.0.0.1:1", channel_options=options):
            pass
    asyncio.run(run())
    Client("127.0.0.1:1").close()
    assert [name for name, _ in made] == ["insecure_channel", "secure_channel", "insecure_channel",
                                          "insecure_channel"]
    assert all(dict(args) == want and len(args) == 3 for _, args in made[:3])
    assert made[3][1] == [("grpc.max_receive_message_length", 512 << 20)]


def test_wait_for_ready_waits_for_a_server_that_starts_later():
    """After a restart a reused client failed UNAVAILABLE until gRPC's
    reconnect back-off ran out (7.5 s, 15.4 s): ``wait_for_ready`` waits for
    the server instead, and back-off channel options shorten the wait."""
    port = free_port()
    quick = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 200)]
    with Client(f"127.0.0.1:{port}", channel_options=quick) as client:
        with pytest.raises(grpc.RpcError) as err:  # the default: fail at once
            client.generate("x", timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        outcome = {}

        def wait():
            outcome["events"] = [e.type for e in client.stream("x", timeout_s=30, wait_for_ready=True)]
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # waiting, not failed
        with fake_genserve(Fake(), port=port):
            waiter.join(20)
            assert outcome == {"events": [EV.COMPLETED]}
            assert client.generate("y", timeout_s=10, wait_for_ready=True).request_id == "server-made-id"
            assert client.cancel("z", timeout_s=10, wait_for_ready=True) is False


def test_a_token_in_clear_to_another_host_warns():
    import warnings

    with pytest.warns(UserWarning, match="sending a bearer token to 10.0.0.5:50051 without TLS"):
        Client("10.0.0.5:50051", token="t").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///localhost:50051"):
            Client(target, token="t").close()
        Client("10.0.0.5:50051").close()
        Client("10.0.0.5:50051", credentials=grpc.ssl_channel_credentials(), token="t").close()
