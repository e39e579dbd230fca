"""TLS at the gRPC edge and in the clients: reading and checking the PEM
files the flags name, and building grpc credentials from them.

Each problem is a ``SecurityError`` naming the flag and the file, found before
any worker starts (grpc itself would only find out when it binds or connects,
with a message about the port or the connection): a file that is missing,
empty or not PEM, a key that is not the certificate's, a passphrase-protected
key (refused rather than prompted for on a terminal). A certificate out of
date, or expiring within 14 days, is served with a warning.
"""
from __future__ import annotations

import logging
import pathlib
import ssl
from datetime import datetime, timezone

import grpc

from genserve.config import Security
from genserve.pem import date_warnings

log = logging.getLogger("genserve.security")


class SecurityError(ValueError):
    """A security file is missing, unreadable or malformed."""


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path``, which flag ``what`` names; SecurityError if it is unreadable or empty."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise SecurityError(f"{what} {path}: {err.strerror or err}") from err
    if not data.strip():
        raise SecurityError(f"{what} {path}: empty file")
    return data


def _read_pair(cert_path: str, key_path: str, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """(key, certificate chain): PEM, the key unencrypted and the certificate's
    (grpc would only find out when it binds or connects, with a message about
    the port or the connection). Logs a warning for a certificate out of date."""
    cert = read_file(cert_path, cert_flag)  # in the order the flags are usually given
    key = read_file(key_path, key_flag)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise SecurityError(f"{cert_flag} {cert_path}: not a PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise SecurityError(f"{key_flag} {key_path}: not a PEM private key")
    def encrypted():  # OpenSSL asks for the passphrase: refuse instead of prompting on the terminal
        raise SecurityError(f"{key_flag} {key_path}: the key is encrypted (passphrase-protected); give it "
                            f"unencrypted (openssl pkey -in {key_path} -out key.pem), readable by this user only")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_path, key_path, password=encrypted)
    except ssl.SSLError as err:
        why = "is not the key of" if "KEY_VALUES_MISMATCH" in str(err) else "does not load with"
        raise SecurityError(f"{key_flag} {key_path} {why} {cert_flag} {cert_path} ({err.reason or err})") from None
    for line in date_warnings(cert, f"{cert_flag} {cert_path}", datetime.now(timezone.utc)):
        log.warning("%s", line)  # served anyway: an operator may need the server up
    return key, cert


def _check_ca(path: str, flag: str) -> bytes:
    data = read_file(path, flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as err:
        raise SecurityError(f"{flag} {path}: not a PEM CA bundle ({err.reason or err})") from None
    return data


def server_credentials(sec: Security) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual TLS when ``tls_client_ca`` is set), or None.
    SecurityError names the flag of a file that is missing, malformed or
    (a key) not the certificate's."""
    if not sec.tls_cert:
        return None
    pair = _read_pair(sec.tls_cert, sec.tls_key, "--tls-cert", "--tls-key")
    if not sec.tls_client_ca:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_check_ca(sec.tls_client_ca, "--tls-client-ca"),
                                       require_client_auth=True)


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client-side TLS: trust ``ca`` (empty: the system roots); ``cert`` and
    ``key`` present a client certificate for mutual TLS."""
    if bool(cert) != bool(key):
        raise SecurityError("--tls-client-cert and --tls-client-key go together (a client certificate "
                            "needs both)")
    pair = _read_pair(cert, key, "--tls-client-cert", "--tls-client-key") if cert else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=_check_ca(ca, "--tls-ca") if ca else None,
                                        private_key=pair[0], certificate_chain=pair[1])
