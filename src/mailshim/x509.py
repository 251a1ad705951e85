"""Read what an administrator needs from an X.509 certificate: a small, bounds-checked DER reader.

``parse_certificate(der)`` returns the subject, issuer, subjectAltName names and validity of the
listener's certificate for ``mailshim check`` to show; it understands only the few fields it
needs and gives up (None) on anything odd rather than guessing.

Trust: the certificate comes from the listener, which is hostile-or-broken by assumption. Every
length is checked against its enclosing element, nesting and element counts are bounded, and
names are made printable. Pure: no I/O. Raises nothing: malformed input gives None.
"""

from __future__ import annotations

from mailshim.errors import one_line

__all__ = ["parse_certificate"]

_NAME_OIDS = {
    b"\x55\x04\x03": "CN",
    b"\x55\x04\x0a": "O",
    b"\x55\x04\x0b": "OU",
    b"\x55\x04\x06": "C",
    b"\x55\x04\x07": "L",
    b"\x55\x04\x08": "ST",
}
_SAN_OID = b"\x55\x1d\x11"
_STRING_CODECS = {
    0x0C: "utf-8",
    0x13: "ascii",
    0x16: "ascii",
    0x14: "latin-1",
    0x1E: "utf-16-be",
    0x1C: "utf-32-be",
}


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the element at ``pos``; ValueError if malformed."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("long tag")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("overrun")
    return tag, pos, pos + length


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, vstart, vend = _tlv(data, pos, end)
        out.append((tag, vstart, vend))
        pos = vend
        if len(out) > 1000:
            raise ValueError("too many elements")
    return out


def _name(data: bytes, start: int, end: int) -> str:
    parts = []
    for tag, s, e in _items(data, start, end):
        if tag != 0x31:
            raise ValueError("not a SET")
        for tag2, s2, e2 in _items(data, s, e):
            if tag2 != 0x30:
                raise ValueError("not a SEQUENCE")
            pair = _items(data, s2, e2)
            if len(pair) < 2 or pair[0][0] != 0x06:
                raise ValueError("bad attribute")
            key = _NAME_OIDS.get(data[pair[0][1] : pair[0][2]])
            codec = _STRING_CODECS.get(pair[1][0])
            if key is None or codec is None:
                continue
            value = data[pair[1][1] : pair[1][2]].decode(codec, "replace")
            parts.append(f"{key}={one_line(value)}")
    return ", ".join(parts)


def _time(data: bytes, tag: int, start: int, end: int) -> int:
    import calendar

    text = data[start:end].decode("ascii")
    if not text.endswith("Z"):
        raise ValueError("not UTC")
    digits = text[:-1]
    if tag == 0x17 and len(digits) == 12:
        year = int(digits[:2])
        year += 1900 if year >= 50 else 2000
        rest = digits[2:]
    elif tag == 0x18 and len(digits) == 14:
        year = int(digits[:4])
        rest = digits[4:]
    else:
        raise ValueError("bad time")
    if not rest.isdigit():
        raise ValueError("bad time")
    fields = [int(rest[i : i + 2]) for i in range(0, 10, 2)]
    return calendar.timegm((year, *fields, 0, 0, 0))


def _san(data: bytes, start: int, end: int) -> list[str]:
    import ipaddress

    tag, s, e = _tlv(data, start, end)
    if tag != 0x30:
        raise ValueError("bad SAN")
    names = []
    for tag2, s2, e2 in _items(data, s, e):
        if tag2 == 0x82:
            names.append(one_line(data[s2:e2].decode("ascii", "replace")))
        elif tag2 == 0x87 and e2 - s2 in (4, 16):
            names.append(str(ipaddress.ip_address(data[s2:e2])))
    return names


def parse_certificate(der: bytes) -> dict[str, object] | None:
    """Subject, issuer, subjectAltName names and expiry of an X.509 certificate, or None.

    Only what an administrator needs to recognise the certificate; anything malformed or
    unexpected gives None rather than an exception.
    """
    try:
        return _parse_certificate(der)
    except (ValueError, IndexError, UnicodeDecodeError, OverflowError):
        return None


def _parse_certificate(der: bytes) -> dict[str, object]:
    tag, s, e = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise ValueError("not a certificate")
    tbs_tag, ts, te = _tlv(der, s, e)
    if tbs_tag != 0x30:
        raise ValueError("no tbsCertificate")
    fields = _items(der, ts, te)
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]  # version
    if len(fields) < 6:
        raise ValueError("short tbsCertificate")
    issuer, validity, subject = fields[2], fields[3], fields[4]
    out: dict[str, object] = {
        "subject": _name(der, subject[1], subject[2]),
        "issuer": _name(der, issuer[1], issuer[2]),
        "names": [],
    }
    times = _items(der, validity[1], validity[2])
    if len(times) == 2:
        out["not_before"] = _time(der, times[0][0], times[0][1], times[0][2])
        out["not_after"] = _time(der, times[1][0], times[1][1], times[1][2])
    for tag2, s2, e2 in fields[6:]:
        if tag2 != 0xA3:
            continue
        ext_tag, xs, xe = _tlv(der, s2, e2)
        if ext_tag != 0x30:
            raise ValueError("bad extensions")
        for tag3, s3, e3 in _items(der, xs, xe):
            parts = _items(der, s3, e3)
            if (
                tag3 == 0x30
                and len(parts) >= 2
                and parts[0][0] == 0x06
                and der[parts[0][1] : parts[0][2]] == _SAN_OID
                and parts[-1][0] == 0x04
            ):
                out["names"] = _san(der, parts[-1][1], parts[-1][2])
    return out
