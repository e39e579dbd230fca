"""The validity dates of PEM certificates, read with the standard library
alone (``ssl`` decodes a certificate only once a peer presents it).

genserve reads its certificates once, at start: one that has expired, or is
not valid yet, starts a server that every TLS client refuses ("certificate
has expired"), so ``security`` warns about it in the log then.
"""
from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone

SOON_DAYS = 14  # warn this long before a certificate expires
_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x17, 0x18, 0xA0  # DER tags


def validity(pem: bytes) -> list[tuple[datetime, datetime]]:
    """(notBefore, notAfter), in UTC, of each certificate in ``pem`` in file
    order. ValueError if one is not an X.509 certificate's DER."""
    return [_validity(base64.b64decode(b"".join(block.split()), validate=True))
            for block in _CERT.findall(pem)]


def date_warnings(pem: bytes, where: str, now: datetime, soon_days: float = SOON_DAYS) -> list[str]:
    """One line for each certificate in ``pem`` that TLS clients refuse at
    ``now`` (expired, or not valid yet) or will refuse within ``soon_days``;
    ``where`` names the file. Nothing for dates that do not read (the file
    loaded, so they are not worth a refusal to start)."""
    try:
        chain = validity(pem)
    except (ValueError, IndexError):
        return []
    lines = []
    for number, (not_before, not_after) in enumerate(chain, 1):
        which = where if len(chain) == 1 else f"{where} (certificate {number} of {len(chain)})"
        if not_after < now:
            lines.append(f"{which} expired on {_day(not_after)} (notAfter): TLS clients refuse it "
                         "('certificate has expired'); replace it and restart the server")
        elif not_before > now:
            lines.append(f"{which} is not valid until {_day(not_before)} (notBefore): TLS clients refuse it "
                         "until then (is this machine's clock right?)")
        elif not_after - now < timedelta(days=soon_days):
            days = (not_after - now) / timedelta(days=1)
            lines.append(f"{which} expires on {_day(not_after)} (notAfter), in {days:.1f} day(s): replace it "
                         "and restart the server before then")
    return lines


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _validity(der: bytes) -> tuple[datetime, datetime]:
    """Certificate ::= SEQUENCE { tbsCertificate, ... }; TBSCertificate ::=
    SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity SEQUENCE { notBefore, notAfter }, ... } (RFC 5280)."""
    _, pos, _ = _element(der, 0)  # into Certificate
    _, pos, _ = _element(der, pos)  # into TBSCertificate
    if _element(der, pos)[0] == _VERSION:
        pos = _element(der, pos)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _element(der, pos)[2]
    _, pos, _ = _element(der, pos)  # into Validity
    tag, start, end = _element(der, pos)
    not_before = _time(tag, der[start:end])
    tag, start, end = _element(der, end)
    return not_before, _time(tag, der[start:end])


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at ``pos``: its content is der[start:end]."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes are the length
        size = length & 0x7F
        length, pos = int.from_bytes(der[pos:pos + size], "big"), pos + size
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _time(tag: int, text: bytes) -> datetime:
    """UTCTime (YYMMDDHHMMSSZ, years 50-99 are 19xx) or GeneralizedTime
    (YYYYMMDDHHMMSSZ), as RFC 5280 has certificates write them."""
    value = text.decode("ascii")
    if tag == _UTC_TIME:
        value = ("19" if int(value[:2]) >= 50 else "20") + value
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"not a time (DER tag {tag:#x})")
    return datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
