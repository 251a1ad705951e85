"""Write the hand-made seeds of the fuzz corpus: ``python tests/fuzz/seeds.py``.

Each seed is an input real callers send (cron, PHP, logwatch, Symfony's ``-bs``) or a corner
the parsers must get right. The fuzzer's own finds are added next to them by
``run.sh --merge``; both live in ``tests/fuzz/corpus/<target>/`` and are replayed by
``tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import sys

import targets

HERE = os.path.dirname(os.path.abspath(__file__))
US = b"\x1f"


def _argv(*words: str) -> bytes:
    return US.join(w.encode("utf-8", "surrogateescape") for w in words)


ARGV = {
    "debian-cron": _argv("sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"),
    "cronie": _argv("sendmail", "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"),
    "phpmailer": _argv("sendmail", "-oi", "-fx@example.org", "-t", "-t"),
    "mutt": _argv("sendmail", "-oem", "-oi", "-B8BITMIME", "--", "a@x", "b@y"),
    "fail2ban": _argv("sendmail", "-f", "fail2ban <f@x>", "root"),
    "grouped": _argv("sendmail", "-tif", "me@x", "-ti", "-v"),
    "mailq": _argv("mailq", "-Ac"),
    "queue-modes": _argv("sendmail", "-q", "-qIABC", "-q15m", "-qRsite", "-O", "DeliveryMode=q"),
    "bad-modes": _argv("sendmail", "-bt", "-bd", "-bz", "-"),
    "missing-arg": _argv("sendmail", "-f"),
    "injection": _argv("sendmail", "-f", "a@b\r\nBcc: x", "r\nTo: y", "-F", "x\x00y"),
    "surrogates": b"sendmail" + US + b"-F\xff\xfe" + US + b"r\xc3@x",
}

ADDRESS = {
    "list-display": b"\x00" + b'"Doe, J." <j@x.org>, root (admin), team: a@x, <b@x>;, <@r:c@y>',
    "list-group-empty": b"\x00undisclosed-recipients:;",
    "list-encoded": b"\x00=?UTF-8?B?Wm/Dqw==?= <z@x>, \xc3\xa9l\xc3\xa8ve@\xc3\xa9cole.fr",
    "list-comments": b'\x00a(b(c)d)@(x)e.f, "q\\"t"@x, [1.2.3.4], a@[IPv6:::1]',
    "list-broken": b'\x00"unterminated, (comment, <a@b, a@b>, ;;,,, <>',
    "list-8bit": b"\x00\xff\xfe@\x80, a\x00b@c, d\r\n e@f",
    "envelope-plain": b"\x01<user@example.org>",
    "envelope-null": b"\x01<>",
    "envelope-route": b"\x01<@a,@b:user@c.example>",
    "envelope-quoted": b'\x01"john doe"@example.org',
    "envelope-literal": b"\x01a@[IPv6:2001:db8::1.2.3.4]",
    "envelope-long": b"\x01" + b"a" * 65 + b"@" + b"b." * 130 + b"c",
    "envelope-bad": b"\x01a@b@c, <a@b",
    "aliases-file": (
        b"\x02# comment\nroot: admin@example.org, ops\nops: a, b,\n  c\n"
        b'"quoted name": x@y\npipe: |/usr/bin/prog, /var/mail/f, :include:/x\nloop: loop\n'
        b"a1: a2\na2: a3\na3: a1\n"
    ),
    "aliases-bad": b'\x02no colon here\n: empty\n"unterminated: x\n',
}


def _msg(flags: int, split: int, text: bytes) -> bytes:
    return bytes([flags, split]) + text


CRON = (
    b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n\nbackup done\n"
)
MESSAGE = {
    "cron": _msg(0x00, 0x11, CRON),
    "cron-force": _msg(0x04, 0x23, CRON),
    "cron-rewrite": _msg(0x08, 0x3F, CRON),
    "php-crlf-headers-lf-body": _msg(
        0x02, 0xF1, b"To: a@x\r\nSubject: s\r\nX-PHP: 1\r\n\r\nline\nline\n.\nafter\n"
    ),
    "dot-ends": _msg(0x01, 0x12, b"Subject: x\n\nbody\n.\nnot sent\n"),
    "dot-ends-cr": _msg(0x21, 0x01, b"Subject: x\r\rbody\r.\rnot sent"),
    "dot-at-start": _msg(0x41, 0x11, b".\nrest"),
    "dot-final-no-eol": _msg(0x01, 0x77, b"A: b\n\nx\n."),
    "dotdot-kept": _msg(0x00, 0x11, b"A: b\n\n..\n.x\n"),
    "no-separator": _msg(0x00, 0x12, b"Subject: x\nthis is body\nB: c\n"),
    "no-header": _msg(0x00, 0x12, b"just a body line\n\nmore\n"),
    "folded": _msg(0x02, 0x13, b"Subject: a\n\tb\n c\nTo: x,\n y\nBcc: z\n\nbody"),
    "bcc-resent": _msg(0x02, 0x31, b"Resent-To: a\nResent-Bcc: b\nBcc: c\nTo: d\n\n"),
    "rewrite-fields": _msg(
        0x08, 0x11, b'From: root, "x y" (c) <bin>\nSender: daemon\nReply-To: g: a, b;\n\nx\n'
    ),
    "8bit": _msg(0x00, 0x11, b"Subject: \xc3\xa9t\xc3\xa9\nX: \xff\xfe\n\n\x80\x81\n"),
    "long-name": _msg(0x00, 0x11, b"X" * 1000 + b": v\n\nbody\n"),
    "empty": _msg(0x00, 0x00, b""),
    "only-newlines": _msg(0x01, 0x11, b"\n\n\r\r\n"),
    "colon-lines": _msg(0x00, 0x11, b": no name\nA B: space in name\nA : trailing\n\n"),
    "crlf-split": _msg(0x21, 0x11, b"A: b\r\n\r\n.\r\n"),
    "display-injection": _msg(0x80, 0x11, b"Subject: x\r\nBcc: evil\r\n\r\n"),
}

HEADER_LIMIT = {
    "small": b"\x04\x03Subject: aaaaaaaaaaaaaaaaaaaaaaaaaa\nX: y\n\nbody",
    "exact": b"\x02\x81A: 123\r\n\r\n",
    "folded-over": b"\x01\x05A: b\n c\n d\n e\n f\n g\n\n",
}

DOTDATA = {
    "simple": b"\x00a\r\n..b\r\n.\r\nQUIT\r\n",
    "lf-only": b"\x09a\n..\n.\nRSET\n",
    "held-dot": b"\x07x\r\n.",
    "held-dot-cr": b"\x07x\r\n.\r",
    "dot-cr-x": b"\x01.\rX\r\n.\r\n",
    "first-line-dot": b"\x11.hidden\r\n.\r\n",
    "no-end": b"\x22line\r\nline",
}

SMTP = {
    "symfony": (
        b"HELO [127.0.0.1]\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<root>\r\nDATA\r\n"
        b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
    ),
    "pipelined": (
        b"EHLO x\r\nMAIL FROM:<> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<a@b>\r\nRCPT TO:<loop>\r\n"
        b"DATA\r\nx\r\n.\r\nMAIL FROM:<b@c>\r\nRCPT TO:<c@d>\r\nRSET\r\nQUIT\r\n"
    ),
    "utf8": (
        b"EHLO x\r\nMAIL FROM:<\xc3\xa9@x> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@y>\r\nDATA\r\n.\r\n"
        b"MAIL FROM:<\xc3\xa9@x>\r\n"
    ),
    "errors": (
        b"DATA\r\nRCPT TO:<a@b>\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@b> FOO=1\r\nSTARTTLS\r\n"
        b"VRFY\r\nHELP\r\nNOOP\r\n\r\n\xff\xfe\r\nMAIL FROM:<a\x00b>\r\nQUIT"
    ),
    "too-many-rcpts": b"EHLO x\r\nMAIL FROM:<a@b>\r\n" + b"RCPT TO:<r@x>\r\n" * 7 + b"DATA\r\n",
    "long-line": b"EHLO " + b"x" * 1200 + b"\r\nNOOP\r\n",
    "big-data": b"HELO x\r\nMAIL FROM:<a@b> SIZE=99999999\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    b"DATA\r\n" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n",
    "listener-reply": b"550-5.1.1 no such user\r\n550 second line\r\n",
}

SPOOLFMT = {
    "entry": b"\x00" + targets.valid_entry(),
    "entry-many": b"\x00" + targets.valid_entry(40),
    "entry-truncated": b"\x00" + targets.valid_entry()[:60],
    "entry-bad-size": b"\x00" + targets.valid_entry().replace(b"size 0", b"size x"),
    "state": b'\x01{"format": "MAILSHIM-STATE 1", "attempts": 3, "done": {"a@b": "250 ok"}}',
    "state-full": (
        b'\x01{"attempts": 2, "done": {}, "failed": {"x@y": "550 no"}, "first_attempt": 17,'
        b' "format": "MAILSHIM-STATE 1", "held": true, "last_error": "451 later",'
        b' "next_attempt": 99, "pending": {"z@w": "451"}, "warned": false}'
    ),
    "state-types": b'\x01{"format": "MAILSHIM-STATE 1", "attempts": true, "held": 1}',
    "state-bad": b"\x01\xff{not json",
    "state-deep-nesting": b'\x01{"format": "MAILSHIM-STATE 1", "done": ' + b"[" * 5000,
    "line-ends": b"\x02a\nb\r\nc\rd\r\r\n\n\re",
    "line-ends-split-cr": b"\x05\r\r\r\n\n\n\r",
}

BOUNCE = {
    "failed": (
        b"\x01s@example.org\x1fSubject: x\r\nTo: r@example.net\r\n\x1fr@example.net\x1f550 5.1.1 no"
    ),
    "delayed-all-flags": (
        b"\x0es@example.org\x1fSubject: y\r\n\x1fa@b\x1f451 4.3.0 later\x1fc@d\x1f"
    ),
    "hostile-sender": b"\x01a@b>, <evil@example.net\x1f\x1f\xff\x1b[31m\x1f\r\n 550 x",
    "boundary-clash": b"\x01s@x\x1f--=_mailshim_0123456789ABCDEFGHIJ_0\r\n\x1fr@x\x1f554",
    "utf8": b"\x01\xc3\xa9@x\x1fSubject: \xc3\xa9\r\n\x1f\xc3\xa9@y\x1f550 5.1.1 \xc3\xa9",
}

ALL = {
    "argv": ARGV,
    "address": ADDRESS,
    "message": MESSAGE,
    "header_limit": HEADER_LIMIT,
    "dotdata": DOTDATA,
    "smtp": SMTP,
    "spoolfmt": SPOOLFMT,
    "bounce": BOUNCE,
}


def main() -> int:
    for target, seeds in ALL.items():
        folder = os.path.join(HERE, "corpus", target)
        os.makedirs(folder, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(folder, f"seed-{name}"), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
