"""Address headers as the recipient sees them: the real `sendmail` qualifies bare names.

Postfix's ``append_at_myorigin`` for locally submitted mail: ``To: root`` reaches the listener
as ``To: root@example.org``; every other byte stays. ``qualify_headers = false`` turns it off.
"""

from __future__ import annotations

CRON = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@host> test -x /usr/sbin/anacron || run-parts --report /etc/cron.daily\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\n"
    b"X-Cron-Env: <LOGNAME=root>\n"
    b"\n"
    b"run-parts: /etc/cron.daily/backup exited with return code 1 (root)\n"
)

# sudo 1.9 (Debian bookworm), mail_badpass: `sendmail -t` as root, stdout/stderr /dev/null.
SUDO = (
    b"To: root\n"
    b"From: root\n"
    b"Auto-Submitted: auto-generated\n"
    b"Subject: *** SECURITY information for host ***\n"
    b"\n"
    b"host : Dec  2 02:00:00 : alice : 3 incorrect password attempts ; TTY=pts/0 ;"
    b" PWD=/home/alice ; USER=root ; COMMAND=/bin/sh\n"
)


def _headers(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_cron_headers_are_qualified_and_nothing_else_changes(world):
    r = world.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=CRON)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("From") == ["root@example.org (Cron Daemon)"]
    assert msg.header("To") == ["root@example.org"]
    assert msg.rcpt_tos == ["admin@example.org"]  # the envelope follows the alias
    head = _headers(msg.data)
    original = CRON.split(b"\n\n", 1)[0].split(b"\n")
    # The caller's fields in their order, only the two address fields touched...
    assert head[: len(original)] == [
        b"From: root@example.org (Cron Daemon)",
        b"To: root@example.org",
        *original[2:],
    ]
    # ...then what cron never writes: Date and Message-ID.
    assert [h.split(b":")[0] for h in head[len(original) :]] == [b"Date", b"Message-ID"]
    assert msg.body == CRON.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def test_sudo_headers_are_qualified(world):
    r = world.sendmail("-t", input=SUDO)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("To") == ["root@example.org"]
    assert msg.header("From") == ["root@example.org"]
    assert msg.header("Auto-Submitted") == ["auto-generated"]
    assert msg.rcpt_tos == ["admin@example.org"]


def test_every_address_field_and_its_resent_form(world):
    text = (
        b"Resent-From: ops\n"
        b"Resent-Sender: ops-bot\n"
        b"Resent-To: Team <oncall>, ext@example.net\n"
        b"Resent-Cc: audit,\n\tboss (the boss)\n"
        b'From: "Web App" <www-data>\n'
        b"Sender: www-data\n"
        b"Reply-To: support\n"
        b"To: alice, bob@example.net\n"
        b"Cc: undisclosed-recipients:;\n"
        b"Comments: root\n"
        b"Subject: to: root\n"
        b"\n"
        b"To: root\n"
    )
    r = world.sendmail("-t", "-i", input=text)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    head = _headers(msg.data)
    assert head[:4] == [
        b"Resent-From: ops@example.org",
        b"Resent-Sender: ops-bot@example.org",
        b"Resent-To: Team <oncall@example.org>, ext@example.net",
        b"Resent-Cc: audit@example.org,",
    ]
    assert head[4] == b"\tboss@example.org (the boss)"
    # The resent block is completed where it is: Resent-Date and Resent-Message-ID.
    assert head[5].startswith(b"Resent-Date: ")
    assert head[6].startswith(b"Resent-Message-ID: <") and head[6].endswith(b"@example.org>")
    assert head[7:14] == [
        b'From: "Web App" <www-data@example.org>',
        b"Sender: www-data@example.org",
        b"Reply-To: support@example.org",
        b"To: alice@example.org, bob@example.net",
        b"Cc: undisclosed-recipients:;",
        b"Comments: root",
        b"Subject: to: root",
    ]
    assert msg.body == b"To: root\r\n"  # the body is not a header
    assert msg.header("Message-ID") != msg.header("Resent-Message-ID")
    # -t with Resent- fields: the resent recipients only.
    assert msg.rcpt_tos == [
        "oncall@example.org",
        "ext@example.net",
        "audit@example.org",
        "boss@example.org",
    ]


def test_existing_resent_date_and_id_are_kept(world):
    text = (
        b"Resent-Date: Tue, 1 Dec 2026 10:00:00 +0000\n"
        b"Resent-Message-ID: <r1@example.net>\n"
        b"Resent-To: carol@example.net\n"
        b"From: a@example.net\nSubject: fwd\n\nx\n"
    )
    r = world.sendmail("-t", "-i", input=text)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("Resent-Date") == ["Tue, 1 Dec 2026 10:00:00 +0000"]
    assert msg.header("Resent-Message-ID") == ["<r1@example.net>"]


def test_no_resent_fields_no_resent_additions(world):
    r = world.sendmail("-i", "root", input=CRON)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert b"Resent-" not in msg.data


def test_qualify_headers_false_leaves_them_as_written(world):
    world.config.write_text(
        world.config.read_text().replace(
            'domain = "example.org"', 'domain = "example.org"\nqualify_headers = false'
        )
    )
    r = world.sendmail("-FCronDaemon", "-i", "root", input=CRON)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("From") == ["root (Cron Daemon)"]
    assert msg.header("To") == ["root"]
    assert msg.rcpt_tos == ["admin@example.org"]


def test_unparsable_address_field_is_left_alone(world):
    text = b'From: "broken <root>\nTo: root\nSubject: s\n\nx\n'
    r = world.sendmail("-i", "bob@example.net", input=text)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("From") == ['"broken <root>']
    assert msg.header("To") == ["root@example.org"]


def test_bs_submissions_are_qualified_too(world):
    dialogue = (
        b"HELO [127.0.0.1]\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
        b"DATA\r\nFrom: app\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    r = world.sendmail("-bs", input=dialogue)
    assert r.returncode == 0, r.stderr
    (msg,) = world.listener.wait(1)
    assert msg.header("From") == ["app@example.org"]
