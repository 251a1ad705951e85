"""pflogsumm (Debian's package, 1.1.5) reads mailshim's log: a day of mixed traffic delivered
by the real runner to the test listener, logged to the ``[log] file``, and
``pflogsumm --syslog-name=mailshim`` must count delivered, deferred and bounced as they
happened (the listener's own record is the truth). ``mailshim log --summary`` must agree.

pflogsumm counts a line only when its tag is ``NAME/CMD[pid]:`` and its time RFC 3339 with a
``+HH:MM`` offset (or the classic syslog form): maillog tags delivery lines ``mailshim/smtp``
and writes such times. .ci/monitoring-tools.sh installs pflogsumm in CI, where a missing
tool fails this test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import Env, queue_config, queue_entries


def grand_totals(report: str) -> dict[str, int]:
    out = {}
    for word in ("delivered", "bounced"):
        m = re.search(rf"^\s+(\d+)\s+{word}\s*$", report, re.M)
        assert m, (word, report[:800])
        out[word] = int(m.group(1))
    # "(N deferrals)" follows only when there were some
    m = re.search(r"^\s+(\d+)\s+deferred(?:\s+\((\d+)\s+deferrals\))?\s*$", report, re.M)
    assert m, report[:800]
    out["deferred"], out["deferrals"] = int(m.group(1)), int(m.group(2) or 0)
    return out


def test_pflogsumm_counts_a_day_of_mixed_traffic(world: Env, tmp_path):
    pflogsumm = shutil.which("pflogsumm")
    if pflogsumm is None:
        if os.environ.get("MAILSHIM_REQUIRE_MONITORING_TOOLS"):
            pytest.fail("pflogsumm is not installed (.ci/monitoring-tools.sh installs it)")
        pytest.skip("pflogsumm is not installed (apt-get install pflogsumm)")
    log = tmp_path / "mail.log"
    queue_config(world, mode="queue", queue='retry = ["1s"]', extra=f'[log]\nfile = "{log}"\n')
    handler = world.listener.handler
    refusals = {
        "bob@example.org": "550 5.1.1 no such user",
        "carol@example.org": "451 4.3.0 try later",
        "erin@example.org": "452 4.2.2 greylisted",
    }
    handler.rcpt_replies = dict(refusals)
    queue_entries(world, rcpts=("dave@example.org",), n=3)
    queue_entries(world, rcpts=("bob@example.org", "dave@example.org"))
    queue_entries(world, rcpts=("carol@example.org",))
    queue_entries(world, rcpts=("erin@example.org", "frank@example.org"))
    world.run("mailshim", ["flush"])
    # later that day the listener takes carol and erin; bob stays refused (already bounced)
    handler.rcpt_replies = {"bob@example.org": refusals["bob@example.org"]}
    assert world.run("mailshim", ["flush"]).returncode == 0
    assert world.queued() == []

    delivered = sum(len(m.rcpt_tos) for m in world.listener.messages)  # the bounce included
    truth = {"delivered": delivered, "bounced": 1, "deferred": 2, "deferrals": 2}
    assert delivered == 3 + 1 + 1 + 2 + 1  # dave x3, dave, carol, erin and frank, the bounce

    r = subprocess.run([pflogsumm, "--syslog-name=mailshim", str(log)], capture_output=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert grand_totals(r.stdout.decode()) == truth
    # the same figures from mailshim itself
    s = world.run("mailshim", ["log", "--summary", "--file", str(log)])
    assert s.returncode == 0, s.stderr
    text = s.stdout.decode()
    assert re.search(rf"^\s*{delivered}\s+delivered$", text, re.M), text
    assert re.search(r"^\s*2\s+deferred\s+\(2 deferrals\)$", text, re.M), text
    assert re.search(r"^\s*1\s+bounced$", text, re.M), text


def test_pflogsumm_skips_the_untagged_form(tmp_path):
    """Why the tag matters: the same line as ``mailshim[pid]:`` counts for nothing."""
    pflogsumm = shutil.which("pflogsumm")
    if pflogsumm is None:
        pytest.skip("pflogsumm is not installed")
    line = (
        "2026-12-07T10:00:02+00:00 host {tag}[101]: 0123456789ABCDEFGHIJ: to=<a@example.org>,"
        " relay=relay[127.0.0.1]:25, delay=0.1, status=sent (250 2.0.0 ok)\n"
    )
    for tag, count in (("mailshim", 0), ("mailshim/smtp", 1)):
        log = tmp_path / f"{count}.log"
        log.write_text(line.format(tag=tag))
        r = subprocess.run([pflogsumm, "--syslog-name=mailshim", str(log)], capture_output=True)
        assert grand_totals(r.stdout.decode())["delivered"] == count


def test_summary_of_one_day_in_either_time_format():
    from mailshim import logsummary

    sent = (
        "{stamp} host mailshim/smtp[7]: 0123456789ABCDEFGHIJ: to=<a@example.org>, relay=r,"
        " delay=1, status=sent (250 ok)"
    )
    expired = (
        "2026-12-06T10:00:00+00:00 host mailshim[7]: 0123456789ABCDEFGHIK: moved to dead/:"
        " <b@example.org>: expired in the queue; last error: 451 4.3.0 later; <c@example.org>:"
        " expired in the queue; last error: 451 4.3.0 later"
    )
    lines = [
        sent.format(stamp="2026-12-06T09:00:00+01:00"),
        sent.format(stamp="Dec  6 09:00:01"),
        sent.format(stamp="2026-12-07T09:00:00+01:00"),
        "2026-12-06T09:00:00+01:00 host postfix/smtp[8]: X: to=<a@b>, relay=r, status=sent",
        expired,
    ]
    day = logsummary.summarize(lines, "2026-12-06")
    assert day == {"delivered": 2, "deferred": 0, "deferrals": 0, "bounced": 0, "expired": 2}
    assert logsummary.summarize(lines)["delivered"] == 3


def test_an_echoed_address_cannot_turn_a_bounce_into_a_delivery(world: Env, tmp_path):
    """A user may name any quoted local part, and listeners echo the address in a refusal
    (Postfix: ``550 5.1.1 <ADDR>: Recipient address rejected``): ``log --summary`` must read
    the status from the line's own field, as pflogsumm does, not from the reply's text."""
    log = tmp_path / "mail.log"
    queue_config(world, mode="queue", extra=f'[log]\nfile = "{log}"\n')
    rcpt = '"x, status=sent (250 ok)"@example.org'
    world.listener.handler.rcpt_replies = {rcpt: f"550 5.1.1 <{rcpt}>: no such user"}
    r = world.sendmail("-f", "alice@example.org", "--", rcpt, input=b"Subject: t\n\nhi\n")
    assert r.returncode == 0, r.stderr
    world.run("mailshim", ["flush"])
    lines = log.read_text()
    assert "status=bounced" in lines, lines
    s = world.run("mailshim", ["log", "--summary", "--file", str(log)])
    assert s.returncode == 0, s.stderr
    text = s.stdout.decode()
    assert re.search(r"^\s*1\s+bounced$", text, re.M), text
    pflogsumm = shutil.which("pflogsumm")
    if pflogsumm is not None:  # the reference reader agrees
        r = subprocess.run([pflogsumm, "--syslog-name=mailshim", str(log)], capture_output=True)
        assert grand_totals(r.stdout.decode())["bounced"] == 1
    delivered = sum(len(m.rcpt_tos) for m in world.listener.messages)  # the bounce to alice
    assert re.search(rf"^\s*{delivered}\s+delivered$", text, re.M), text
