"""TLS, mutual TLS, token auth and the per-client stream limit.

Unit tests drive the token parser and the ``Gate`` interceptor on an
in-process grpc.aio server with a fake servicer (fast, exact about when slots
are given back). Live tests start two real servers: TLS + tokens + a stream
limit of 2, and mutual TLS. Certificates are made at test time with the
``openssl`` command (Debian's ``openssl`` package; tests skip without it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, wait_for
from genserve.client import Client
from genserve.config import Security
from genserve.security import (BAD_TOKEN, MISSING_TOKEN, Gate, SecurityError, bearer_token,
                               channel_credentials, client_key, current_tenant, load_security,
                               parse_tokens)
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

TOKENS = "# tenants of the test server\n\ns3cret-alice alice\ns3cret-bob   bob  # trailing comment\n"
CHEAP = dict(task="image", width=64, height=64, steps=1, seed=1)
T = pb.GenerateEvent.Type
Code = grpc.StatusCode


# ---- certificates ---------------------------------------------------------
def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: pathlib.Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _leaf(d: pathlib.Path, name: str, ca: str, usage: str, serial: int) -> None:
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", ext.name, cwd=d)


def _dated_leaf(d: pathlib.Path, name: str, ca: str, start: str, end: str) -> None:
    """A certificate valid from ``start`` to ``end`` (YYYYMMDDHHMMSSZ), which
    only ``openssl ca`` can date in the past (it keeps a small database)."""
    db = d / "ca-db"
    if not db.exists():
        db.mkdir()
        (db / "index.txt").write_text("")
        (db / "serial").write_text("10\n")
        (d / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndatabase = ca-db/index.txt\nnew_certs_dir = ca-db\n"
                                  "serial = ca-db/serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n"
                                  "[p]\ncommonName = supplied\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key", "-notext",
             "-in", f"{name}.csr", "-out", f"{name}.pem", "-startdate", start, "-enddate", end, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    """ca (signs server and client), rogue-ca (signs rogue-client); the keys
    of server and client encrypted (PKCS#8 and OpenSSL's traditional form);
    certificates expired (2020), not valid yet (2050) and valid until 2099."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "serverAuth", 2)
    _leaf(d, "client", "ca", "clientAuth", 3)
    _leaf(d, "rogue-client", "rogue-ca", "clientAuth", 4)
    for name in ("server", "client"):
        _openssl("pkey", "-in", f"{name}.key", "-aes256", "-passout", "pass:secret", "-out", f"{name}-enc.key", cwd=d)
        _openssl("pkey", "-in", f"{name}.key", "-aes256", "-passout", "pass:secret", "-traditional",
                 "-out", f"{name}-enc-traditional.key", cwd=d)
    _dated_leaf(d, "expired", "ca", "20200101000000Z", "20200102000000Z")
    _dated_leaf(d, "future", "ca", "20500101000000Z", "20510101000000Z")
    _dated_leaf(d, "lasting", "ca", "20200101000000Z", "20991231000000Z")
    return d


def creds(pki: pathlib.Path, ca: str = "ca", client: str = "") -> grpc.ChannelCredentials:
    return channel_credentials(str(pki / f"{ca}.pem"), str(pki / f"{client}.pem") if client else "",
                               str(pki / f"{client}.key") if client else "")


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


# ---- tokens and config, no server ------------------------------------------
def test_token_file_parses_comments_and_blanks():
    table = parse_tokens(TOKENS)
    assert len(table) == 2 and table.tenants == {"alice", "bob"}
    assert table.tenant("s3cret-alice") == "alice" and table.tenant("s3cret-bob") == "bob"
    assert table.tenant("s3cret-ali") is None and table.tenant("") is None
    assert table.tenant("s3cret-alice ") is None  # exact match only


@pytest.mark.parametrize("text,fragment", [
    ("good alice\njust-a-token\n", "line 2: expected 'TOKEN TENANT', found 1 field(s)"),
    ("a b c\n", "line 1: expected 'TOKEN TENANT', found 3 field(s)"),
    ("# c\n\ntok\u00e9n carol\n", "line 3: the token must be printable ASCII"),
    ("same alice\nsame bob\n", "line 2: duplicate token"),
    ("# only comments\n\n", "no tokens"),
])
def test_token_file_errors_name_the_line(text, fragment):
    with pytest.raises(SecurityError) as err:
        parse_tokens(text, "tokens.txt")
    assert fragment in str(err.value) and "tokens.txt" in str(err.value)
    assert "same" not in str(err.value).replace("duplicate", "")  # a token is never echoed


@pytest.mark.parametrize("metadata,token", [
    ((("authorization", "Bearer abc"),), "abc"), ((("authorization", "bearer  abc "),), "abc"),
    ((("authorization", "Basic abc"),), None), ((("authorization", "Bearer"),), None),
    ((("x-other", "Bearer abc"),), None), ((), None), (None, None),
    ((("authorization", b"Bearer abc"),), "abc"),
])
def test_bearer_token(metadata, token):
    assert bearer_token(metadata) == token


def test_security_config_validates_without_io():
    Security(tls_cert="/no/such/cert", tls_key="/no/such/key", auth_tokens="/no/such/file").validate()
    for bad in (Security(tls_cert="c"), Security(tls_key="k"), Security(tls_client_ca="ca"),
                Security(max_streams_per_client=-1)):
        with pytest.raises(ValueError):
            bad.validate()


def test_load_security_names_the_missing_file(tmp_path):
    with pytest.raises(SecurityError, match="--auth-tokens /no/such/tokens"):
        load_security(Security(auth_tokens="/no/such/tokens"))
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SecurityError, match="--tls-key"):
        load_security(Security(tls_cert=str(cert), tls_key=str(tmp_path / "missing.key")))
    with pytest.raises(SecurityError, match="--tls-cert"):  # both missing: the first flag's file
        load_security(Security(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key")))
    assert load_security(Security()).credentials is None


def test_token_file_may_start_with_a_byte_order_mark():
    assert parse_tokens("\ufefftokA tenantA\n").tenant("tokA") == "tenantA"


def test_tls_files_are_checked_when_loaded(pki, tmp_path):
    """What grpc would report only at bind or connect time, as a port or
    connection problem: a malformed file, a key that is not the certificate's."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem at all\n")
    server, cert, key, ca = (str(pki / "server.pem"), str(pki / "server.key"), str(pki / "client.key"),
                             str(pki / "ca.pem"))
    cases = [
        (Security(tls_cert=str(garbage), tls_key=cert), f"--tls-cert {garbage}: not a PEM certificate"),
        (Security(tls_cert=server, tls_key=str(garbage)), f"--tls-key {garbage}: not a PEM private key"),
        (Security(tls_cert=server, tls_key=key), f"--tls-key {key} is not the key of --tls-cert {server}"),
        (Security(tls_cert=server, tls_key=cert, tls_client_ca=str(garbage)),
         f"--tls-client-ca {garbage}: not a PEM CA bundle"),
    ]
    for sec, message in cases:
        with pytest.raises(SecurityError) as err:
            load_security(sec)
        assert str(err.value).startswith(message), err.value
    assert load_security(Security(tls_cert=server, tls_key=cert, tls_client_ca=ca)).credentials is not None
    with pytest.raises(SecurityError, match="--tls-ca .*not a PEM CA bundle"):
        channel_credentials(str(garbage))
    with pytest.raises(SecurityError, match="--tls-client-key .* is not the key of --tls-client-cert"):
        channel_credentials(ca, str(pki / "client.pem"), cert)


@pytest.mark.parametrize("form", ["enc", "enc-traditional"])
def test_an_encrypted_key_is_refused_in_one_line_without_a_prompt(pki, form, tmp_path):
    """OpenSSL prompted 'Enter PEM pass phrase:' on a terminal and, without
    one, load_cert_chain raised OSError [Errno 22] (a traceback); the client
    commands likewise, and loadgen printed the errno without the file."""
    from genserve.cli import main
    from genserve.loadgen.cli import main as loadgen_main

    server_key, client_key_path = pki / f"server-{form}.key", pki / f"client-{form}.key"

    def refusal(flag, path):
        return (f"{flag} {path}: the key is encrypted (passphrase-protected); give it unencrypted "
                f"(openssl pkey -in {path} -out key.pem), readable by this user only")
    with pytest.raises(SecurityError) as err:
        load_security(Security(tls_cert=str(pki / "server.pem"), tls_key=str(server_key)))
    assert str(err.value) == refusal("--tls-key", server_key)
    with pytest.raises(SecurityError) as err:
        channel_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(client_key_path))
    assert str(err.value) == refusal("--tls-client-key", client_key_path)
    flags = ["--target", "127.0.0.1:1", "--tls-ca", str(pki / "ca.pem"), "--tls-client-cert",
             str(pki / "client.pem"), "--tls-client-key", str(client_key_path)]
    for command in (["models"], ["generate", "a cat"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, *flags])
        assert exc.value.code == "error: " + refusal("--tls-client-key", client_key_path)
    with pytest.raises(SystemExit) as exc:
        loadgen_main(["run", *flags, "--num-requests", "1", "--out", str(tmp_path / "out")])
    assert exc.value.code == "loadgen: " + refusal("--tls-client-key", client_key_path)
    # the real command, with no terminal to prompt on (a new session): one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "genserve", "serve", "--port", "0", "--tls-cert",
                           str(pki / "server.pem"), "--tls-key", str(server_key)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    assert proc.returncode == 1 and proc.stderr == f"error: {refusal('--tls-key', server_key)}\n", proc.stderr


@pytest.mark.parametrize("name, warning", [
    ("expired", "expired on 2020-01-02 00:00:00 UTC (notAfter): TLS clients refuse it"),
    ("future", "is not valid until 2050-01-01 00:00:00 UTC (notBefore)"),  # a GeneralizedTime
    ("server", "day(s): replace it and restart the server before then"),  # made for 2 days
    ("lasting", None),
])
def test_a_certificate_out_of_date_is_one_warning_when_loaded(pki, caplog, name, warning):
    """The server started with an expired certificate without a word and
    reported SERVING; every TLS client failed 'certificate has expired'. It
    still starts (an operator may need it up), with one WARNING line."""
    cert, key = pki / f"{name}.pem", pki / f"{name}.key"
    with caplog.at_level(logging.WARNING, logger="genserve.security"):
        assert load_security(Security(tls_cert=str(cert), tls_key=str(key))).credentials is not None
        channel_credentials(str(pki / "ca.pem"), str(cert), str(key))  # a client certificate: the same
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert lines == []
    else:
        assert len(lines) == 2 and warning in lines[0] and warning in lines[1], lines
        assert lines[0].startswith(f"--tls-cert {cert} ") and lines[1].startswith(f"--tls-client-cert {cert} ")


def test_token_file_with_crlf_line_endings():
    table = parse_tokens("tokA alice\r\ntokB bob\r\n", "tokens.txt")
    assert table.tenant("tokA") == "alice" and table.tenant("tokB") == "bob" and table.tenant("tokA\r") is None


@pytest.mark.parametrize("flags", [["--tls-client-key", "k.pem"], ["--tls-ca", "/no/such/ca.pem"]])
def test_client_commands_refuse_bad_tls_flags_with_one_line(flags):
    from genserve.cli import main

    for command in (["models"], ["generate", "a cat"]):
        with pytest.raises(SystemExit) as err:
            main([*command, "--target", "127.0.0.1:1", *flags])
        assert isinstance(err.value.code, str) and err.value.code.startswith("error: --tls-"), err.value.code


def test_client_key_uses_tenant_else_peer_host():
    assert client_key("alice", "ipv4:10.0.0.1:5000") == "tenant:alice"
    assert client_key("", "ipv4:10.0.0.1:5000") == client_key("", "ipv4:10.0.0.1:6000") == "peer:ipv4:10.0.0.1"
    assert client_key("", "ipv6:[::1]:5000") == "peer:ipv6:[::1]"


@pytest.mark.parametrize("flags,message", [
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
    (["--max-streams-per-client", "-1"], "--max-streams-per-client must be >= 0"),
    (["--demo", "--auth-tokens", "tokens.txt"], "--demo talks to the server in plaintext without a token"),
    (["--demo", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "--demo talks to the server in plaintext"),
])
def test_serve_rejects_bad_flag_combinations(flags, message):
    from genserve.cli import main

    with pytest.raises(SystemExit) as err:
        main(["serve", "--port", "0", *flags])
    assert err.value.code == f"error: {message}" or message in str(err.value.code)


def test_serve_rejects_a_malformed_token_file_at_start(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("good alice\nno-tenant-here\n")
    proc = subprocess.run([sys.executable, "-m", "genserve", "serve", "--port", "0", "--auth-tokens", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{bad} line 2: expected 'TOKEN TENANT'" in proc.stderr
    assert "starting" not in proc.stderr  # refused before any worker started
    assert "Traceback" not in proc.stderr


# ---- the Gate on an in-process server with a fake servicer --------------------
class FakeService(pb_grpc.GenServeServicer):
    """Generate calls block until ``release`` is set; records tenants seen."""

    def __init__(self):
        self.release = asyncio.Event()
        self.tenants: list[str] = []

    async def Generate(self, request, context):
        self.tenants.append(current_tenant.get())
        if request.prompt == "fail":
            await context.abort(Code.INVALID_ARGUMENT, "prompt: refused")
        await self.release.wait()
        return pb.GenerateResponse(request_id=request.request_id)

    async def GenerateStream(self, request, context):
        self.tenants.append(current_tenant.get())
        yield pb.GenerateEvent(request_id=request.request_id, type=pb.GenerateEvent.QUEUED)
        await self.release.wait()
        yield pb.GenerateEvent(request_id=request.request_id, type=pb.GenerateEvent.COMPLETED)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse()


async def _gate_server(gate: Gate):
    server, service = grpc.aio.server(interceptors=[gate]), FakeService()
    pb_grpc.add_GenServeServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, service, channel, pb_grpc.GenServeStub(channel), f"127.0.0.1:{port}"


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def test_gate_auth_and_tenant():
    async def main():
        gate = Gate(parse_tokens(TOKENS), max_streams=0)
        server, service, channel, stub, _ = await _gate_server(gate)
        try:
            for md, want in ((None, MISSING_TOKEN), ((("authorization", "Bearer nope"),), BAD_TOKEN)):
                with pytest.raises(grpc.RpcError) as err:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=md)
                assert err.value.code() == Code.UNAUTHENTICATED and err.value.details() == want
                with pytest.raises(grpc.RpcError) as err:
                    async for _ in stub.GenerateStream(pb.GenerateRequest(), metadata=md):
                        pass
                assert err.value.code() == Code.UNAUTHENTICATED and "nope" not in err.value.details()
            garbage = channel.unary_unary("/genserve.v1.GenServe/Generate")  # raw bytes in and out
            assert await _code(garbage(b"\x00", metadata=md)) == Code.UNAUTHENTICATED  # refused unparsed
            with pytest.raises(grpc.RpcError) as err:
                await garbage(b"\x00", metadata=(("authorization", "Bearer s3cret-bob"),))
            assert err.value.code() == Code.INVALID_ARGUMENT and "does not parse" in err.value.details()
            service.release.set()
            await stub.Generate(pb.GenerateRequest(), metadata=(("authorization", "Bearer s3cret-bob"),))
            assert service.tenants == ["bob"]
        finally:
            await channel.close()
            await server.stop(None)
    asyncio.run(main())


def test_gate_stream_limit_is_released_however_calls_end():
    async def main():
        gate = Gate(parse_tokens(TOKENS), max_streams=2)
        server, service, channel, stub, _ = await _gate_server(gate)
        alice, bob = (("authorization", "Bearer s3cret-alice"),), (("authorization", "Bearer s3cret-bob"),)
        held = lambda: gate.streams.active.get("tenant:alice", 0)  # noqa: E731
        try:
            unary = stub.Generate(pb.GenerateRequest(request_id="u"), metadata=alice)
            stream = stub.GenerateStream(pb.GenerateRequest(request_id="s"), metadata=alice)
            await stream.read()
            await asyncio.sleep(0.1)
            assert held() == 2
            with pytest.raises(grpc.RpcError) as err:
                await stub.Generate(pb.GenerateRequest(), metadata=alice)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED and "limit 2 per client" in err.value.details()
            assert dict(err.value.trailing_metadata()).get("retry-after-ms") == "1000"
            assert held() == 2  # a refusal takes no slot
            other = stub.Generate(pb.GenerateRequest(request_id="b"), metadata=bob)  # bob has his own budget
            await asyncio.sleep(0.1)
            assert gate.streams.active["tenant:bob"] == 1
            unary.cancel()
            stream.cancel()
            await asyncio.sleep(0.2)
            assert held() == 0  # client cancels give slots back
            assert await _code(stub.Generate(pb.GenerateRequest(), metadata=alice, timeout=0.2)) \
                == Code.DEADLINE_EXCEEDED
            assert await _code(stub.Generate(pb.GenerateRequest(prompt="fail"), metadata=alice)) \
                == Code.INVALID_ARGUMENT
            stream = stub.GenerateStream(pb.GenerateRequest(), metadata=alice, timeout=0.3)
            assert await _code(stream.wait_for_connection()) == Code.OK
            with pytest.raises(grpc.RpcError):
                async for _ in stream:
                    pass
            await asyncio.sleep(0.2)
            assert held() == 0  # deadlines and errors too
            service.release.set()
            await other
            for _ in range(5):  # a client at its limit can go again as soon as a call returns
                await asyncio.gather(*(stub.Generate(pb.GenerateRequest(), metadata=alice) for _ in range(2)))
            async for _ in stub.GenerateStream(pb.GenerateRequest(), metadata=alice):
                pass
            assert gate.streams.active == {}
        finally:
            await channel.close()
            await server.stop(None)
    asyncio.run(main())


def test_gate_without_tokens_limits_by_peer_host():
    async def main():
        refused = []
        gate = Gate(None, max_streams=1, refused=lambda status, request=None: refused.append((status, request)))
        server, service, channel, stub, target = await _gate_server(gate)
        try:
            first = stub.Generate(pb.GenerateRequest())
            await asyncio.sleep(0.1)
            assert list(gate.streams.active) == ["peer:ipv4:127.0.0.1"]
            other = grpc.aio.insecure_channel(target)  # another connection from the same host
            over = pb.GenerateRequest(model="sd3-tiny")
            assert await _code(pb_grpc.GenServeStub(other).Generate(over)) == Code.RESOURCE_EXHAUSTED
            assert await _code(stub.ListModels(pb.ListModelsRequest())) == Code.OK  # only generations count
            service.release.set()
            await first
            await other.close()
            assert gate.streams.active == {} and service.tenants == [""]
            # counted in the request metrics, with the request (its model labels the count)
            assert refused == [("RESOURCE_EXHAUSTED", over)]
        finally:
            await channel.close()
            await server.stop(None)
    asyncio.run(main())


def test_gate_sends_a_client_at_its_limit_elsewhere_while_draining():
    """RESOURCE_EXHAUSTED with retry-after-ms told a client at its limit to
    retry the very server that was shutting down."""
    async def main():
        refused, draining = [], [False]
        gate = Gate(None, max_streams=1, refused=lambda status, request=None: refused.append(status),
                    draining=lambda: draining[0])
        server, service, channel, stub, _ = await _gate_server(gate)
        try:
            first = stub.Generate(pb.GenerateRequest())
            await asyncio.sleep(0.1)
            draining[0] = True
            with pytest.raises(grpc.RpcError) as err:
                await stub.Generate(pb.GenerateRequest())
            assert err.value.code() == Code.UNAVAILABLE and "shutting down" in err.value.details()
            assert "retry-after-ms" not in dict(err.value.trailing_metadata() or ())
            assert refused == ["UNAVAILABLE"]
            service.release.set()
            await first  # what was accepted still finishes
        finally:
            await channel.close()
            await server.stop(None)
    asyncio.run(main())


# ---- live: TLS + tokens + stream limit ----------------------------------------
@pytest.fixture(scope="module")
def tls_server(pki):
    tokens = pki / "tokens.txt"
    tokens.write_text(TOKENS)
    srv = ServerProcess("--num-workers", "1", "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "server.key"), "--auth-tokens", str(tokens),
                        "--max-streams-per-client", "2")
    yield srv
    srv.stop()


def test_tls_with_token_serves(tls_server, pki):
    with Client(tls_server.target, credentials=creds(pki), token="s3cret-alice") as c:
        resp = c.generate("a fox", **CHEAP)
        assert resp.media.data and resp.media.width == 64
        assert {m.name for m in c.models()} >= {"sd3-tiny", "wan-tiny"}
    assert "mutual TLS" not in tls_server.output and "TLS, token auth (2 tenant(s))" in tls_server.output
    # the test certificate lasts 2 days: the server says so as it starts
    assert f"--tls-cert {pki / 'server.pem'} expires on " in tls_server.output


def test_channel_options_reach_the_tls_channel(tls_server, pki):
    """ssl_target_name_override: the name the server's certificate must carry
    (a backend dialled by address whose certificate names a service)."""
    for name, want in (("localhost", Code.OK), ("not-the-server.example", Code.UNAVAILABLE)):
        with Client(tls_server.target, credentials=creds(pki), token="s3cret-alice",
                    channel_options=[("grpc.ssl_target_name_override", name)]) as c:
            assert code_of(lambda: c.models(timeout_s=30)) == want


def test_tls_refuses_plaintext_and_unknown_ca(tls_server, pki):
    with Client(tls_server.target, token="s3cret-alice") as c:  # plaintext to a TLS port
        assert code_of(lambda: c.models()) == Code.UNAVAILABLE
    with Client(tls_server.target, credentials=creds(pki, ca="rogue-ca"), token="s3cret-alice") as c:
        assert code_of(lambda: c.models()) == Code.UNAVAILABLE


def test_token_missing_wrong_right(tls_server, pki):
    for token, want in ((None, MISSING_TOKEN), ("s3cret-mallory", BAD_TOKEN)):
        with Client(tls_server.target, credentials=creds(pki), token=token) as c:
            for call in (lambda: c.models(), lambda: c.generate("x", **CHEAP), lambda: c.cancel("r"),
                         lambda: list(c.stream("x", **CHEAP))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == Code.UNAUTHENTICATED and err.value.details() == want
    with Client(tls_server.target, credentials=creds(pki), token="s3cret-bob") as c:
        assert c.generate("x", **CHEAP).media.data


def test_cli_client_flags(tls_server, pki):
    """``genserve models`` with --tls-ca, and the token from $GENSERVE_TOKEN."""
    cmd = [sys.executable, "-m", "genserve", "models", "--target", tls_server.target, "--tls-ca", str(pki / "ca.pem")]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "GENSERVE_TOKEN": "s3cret-bob"})
    assert ok.returncode == 0 and "sd3-tiny" in ok.stdout, ok.stderr
    denied = subprocess.run(cmd + ["--token", "wrong"], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "GENSERVE_TOKEN"})
    assert denied.returncode != 0 and "UNAUTHENTICATED: invalid bearer token" in denied.stderr


def test_loadgen_through_tls_and_token(tls_server, pki, tmp_path):
    """``genserve loadgen`` takes the client flags: through TLS with a token
    every request is served and the token is not written to the run's files;
    with a wrong token the pre-flight call is refused and nothing is sent."""
    import json

    from genserve.loadgen.cli import main

    args = ["run", "--target", tls_server.target, "--tls-ca", str(pki / "ca.pem"), "--num-requests", "3",
            "--concurrency", "1", "--image-fraction", "1", "--steps-image", "1", "--output-format", "raw",
            "--no-progress", "--no-plots"]
    out = tmp_path / "alice"
    main(args + ["--token", "s3cret-alice", "--out", str(out)])
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["OK"] * 3
    summary = (out / "summary.json").read_text()
    assert "s3cret-alice" not in summary and json.loads(summary)["settings"]["tls"] is True
    out = tmp_path / "wrong"
    with pytest.raises(SystemExit) as refused:
        main(args + ["--token", "wrong", "--out", str(out)])
    assert "refused the pre-flight ListModels call" in str(refused.value)
    assert "UNAUTHENTICATED" in str(refused.value) and not out.exists()


def test_health_needs_no_token(tls_server, pki):
    with grpc.secure_channel(tls_server.target, creds(pki)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "genserve.v1.GenServe"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stream_limit_per_tenant_live(tls_server, pki):
    with Client(tls_server.target, credentials=creds(pki), token="s3cret-alice") as alice, \
            Client(tls_server.target, credentials=creds(pki), token="s3cret-bob") as bob:
        long = dict(task="video", width=64, height=64, num_frames=9, steps=50, seed=2)
        streams = [alice.stream("a long video", **long) for _ in range(2)]
        for s in streams:
            assert next(s).type == pb.GenerateEvent.QUEUED  # both in flight
        with pytest.raises(grpc.RpcError) as err:
            alice.generate("one too many", **CHEAP)
        assert err.value.code() == Code.RESOURCE_EXHAUSTED and "limit 2 per client" in err.value.details()
        bobs = bob.stream("bob has his own budget", **CHEAP)
        assert next(bobs).type == pb.GenerateEvent.QUEUED  # admitted; no need to wait for the result
        for s in (*streams, bobs):
            s.cancel()
        # the server learns of the cancels asynchronously: allow it a moment
        assert wait_for(lambda: code_of(lambda: alice.generate("again", **CHEAP, timeout_s=120)) == Code.OK,
                        timeout_s=30, interval_s=0.2)
        done = [alice.generate("sequential", **CHEAP) for _ in range(2)]  # slots come back after results too
        assert all(r.media.data for r in done)


# ---- live: mutual TLS ------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_server(pki):
    srv = ServerProcess("--num-workers", "1", "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    yield srv
    srv.stop()


def test_mtls_requires_a_client_certificate(mtls_server, pki):
    assert "mutual TLS" in mtls_server.output
    with Client(mtls_server.target, credentials=creds(pki)) as c:  # TLS, but no client certificate
        assert code_of(lambda: c.models()) == Code.UNAVAILABLE
    with Client(mtls_server.target, credentials=creds(pki, client="rogue-client")) as c:  # signed by another CA
        assert code_of(lambda: c.models()) == Code.UNAVAILABLE
    with Client(mtls_server.target, credentials=creds(pki, client="client")) as c:
        assert c.generate("a certified fox", **CHEAP).media.data
    t0 = time.monotonic()
    with grpc.secure_channel(mtls_server.target, creds(pki)) as channel:  # probes need a certificate too
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert time.monotonic() - t0 < 10  # refused at the handshake, not by a timeout


def test_request_ids_are_scoped_per_tenant(tls_server, pki):
    """Bob can neither cancel nor attach to Alice's request by guessing its id."""
    with Client(tls_server.target, credentials=creds(pki), token="s3cret-alice") as alice, \
            Client(tls_server.target, credentials=creds(pki), token="s3cret-bob") as bob:
        stream = alice.stream("alice's video", task="video", steps=30, request_id="shared-id")
        events = iter(stream)
        assert next(events).request_id == "shared-id"  # QUEUED, under the id alice chose
        assert not bob.cancel("shared-id")
        done = [e for e in events if e.type in (T.COMPLETED, T.FAILED, T.CANCELLED)]
        assert done[-1].type == T.COMPLETED and done[-1].response.request_id == "shared-id"
        again = alice.generate("again", request_id="shared-id", **CHEAP)
        assert again.request_id == "shared-id"
