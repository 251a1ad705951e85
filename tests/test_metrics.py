"""Prometheus metrics (metrics.py, mailstats.py, queuestats.py): ``mailshim metrics`` checked
by the real ``promtool check metrics``, and the runner's textfile scraped by a real
``prometheus-node-exporter`` (Debian's packages ``prometheus`` and
``prometheus-node-exporter``; .ci/monitoring-tools.sh installs them in CI, where a missing
tool fails these tests instead of skipping them).

The traffic is real: entries delivered by ``mailshim flush`` to the test listener, one
recipient refused for good, one deferred; the counters must say exactly that.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Env, free_port, queue_config, queue_entries
from mailshim import mailstats, queuestats

NODE_EXPORTER = "prometheus-node-exporter"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("MAILSHIM_REQUIRE_MONITORING_TOOLS"):
            pytest.fail(f"{tool} is not installed (.ci/monitoring-tools.sh installs it)")
        pytest.skip(
            f"{tool} is not installed (apt-get install prometheus prometheus-node-exporter)"
        )
    return path


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of the text format: (name, labels) -> value (a small independent reader)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = []
        for pair in rest.rstrip("}").split('",') if rest else []:
            key, _, val = pair.partition('="')
            labels.append((key, val.rstrip('"')))
        out[(name, frozenset(labels))] = float(value)
    return out


def sample(samples, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def scrape(exporter: str, folder) -> tuple[str, bytes]:
    """Start a real node_exporter on ``folder``'s textfiles, scrape it once: (body, stderr)."""
    port = free_port()
    proc = subprocess.Popen(
        [exporter, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={folder}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    body = resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no node_exporter"
                time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return body, err


def mixed_traffic(world: Env) -> None:
    """Three entries: one delivered, one refused for good (bounced), one deferred."""
    world.listener.handler.rcpt_replies = {
        "bob@example.org": "550 5.1.1 no such user",
        "carol@example.org": "451 4.3.0 try later",
    }
    queue_entries(world, rcpts=("dave@example.org",))
    queue_entries(world, rcpts=("bob@example.org",))
    queue_entries(world, rcpts=("carol@example.org",))
    r = world.run("mailshim", ["flush"])
    assert r.returncode == 0, r.stderr


@pytest.fixture
def mworld(world: Env, tmp_path) -> Env:
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    queue_config(world, mode="queue", queue='retry = ["1h"]',
                 extra=f'[monitoring]\ntextfile_dir = "{textfile}"\n')  # fmt: skip
    world.textfile = textfile  # type: ignore[attr-defined]
    return world


def test_counters_and_queues_after_real_traffic(mworld: Env):
    mixed_traffic(mworld)
    # the bounce to alice went out in the same flush: 2 delivered, 1 bounced, 1 deferred
    assert len(mworld.listener.messages) == 2
    r = mworld.run("mailshim", ["metrics"])
    assert r.returncode == 0, r.stderr
    samples = parse(r.stdout.decode())
    spool = str(mworld.spool)
    deliveries = "mailshim_smtp_deliveries_total"
    assert (
        sample(samples, deliveries, spool=spool, relay="relay", status="sent", **{"class": "2xx"})
        == 2
    )
    assert sample(samples, deliveries, spool=spool, status="bounced", **{"class": "5xx"}) == 1
    assert sample(samples, deliveries, spool=spool, status="deferred", **{"class": "4xx"}) == 1
    assert sample(samples, "mailshim_queue_length", spool=spool, queue="deferred") == 1
    assert sample(samples, "mailshim_queue_length", spool=spool, queue="dead") == 1
    assert sample(samples, "mailshim_queue_length", spool=spool, queue="new") == 0
    assert sample(samples, "mailshim_queue_size_bytes", spool=spool, queue="deferred") > 0
    delay = "mailshim_smtp_delivery_delay_seconds"
    assert sample(samples, delay + "_count", spool=spool, status="sent") == 2
    assert sample(samples, delay + "_bucket", spool=spool, status="sent", le="+Inf") == 2
    assert sample(samples, "mailshim_relay_up", spool=spool, relay="relay") == 1
    last = sample(samples, "mailshim_last_delivery_timestamp_seconds", spool=spool)
    assert abs(last - time.time()) < 600
    assert sample(samples, "mailshim_info", schema="1") == 1
    # the durable counters survive the process, and a second pass adds to them
    mworld.listener.handler.rcpt_replies = {}
    assert mworld.run("mailshim", ["flush"]).returncode == 0
    samples = parse(mworld.run("mailshim", ["metrics"]).stdout.decode())
    assert sample(samples, deliveries, spool=spool, status="sent", **{"class": "2xx"}) == 3
    assert sample(samples, "mailshim_queue_length", spool=spool, queue="deferred") == 0


def test_promtool_accepts_the_text(mworld: Env):
    promtool = need("promtool")
    mixed_traffic(mworld)
    text = mworld.run("mailshim", ["metrics"]).stdout
    assert b"\nmailshim_smtp_delivery_delay_seconds_bucket{" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    # exit 0 and no lint remark at all (promtool prints problems, one per line)
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", (r.stdout, r.stderr)


def test_promtool_notices_a_broken_text(mworld: Env):
    """The check above can fail: promtool refuses a counter without _total."""
    promtool = need("promtool")
    queue_entries(mworld)
    text = mworld.run("mailshim", ["metrics"]).stdout
    assert b"mailshim_limit_holds_total{" in text
    text = text.replace(b"_limit_holds_total", b"_holds")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode != 0


def test_node_exporter_scrapes_the_textfile(mworld: Env, tmp_path):
    exporter = need(NODE_EXPORTER)
    mixed_traffic(mworld)
    prom = mworld.textfile / "mailshim.prom"  # type: ignore[attr-defined]
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(os.listdir(mworld.textfile)) == ["mailshim.prom"]  # no temp file left
    body, _err = scrape(exporter, mworld.textfile)  # type: ignore[attr-defined]
    samples = parse(body)
    assert sample(samples, "node_textfile_scrape_error") == 0
    spool = str(mworld.spool)
    assert sample(samples, "mailshim_queue_length", spool=spool, queue="deferred") == 1
    assert sample(samples, "mailshim_smtp_deliveries_total", spool=spool, status="bounced",
                  **{"class": "5xx"}) == 1  # fmt: skip
    assert sample(samples, "mailshim_relay_up", spool=spool, relay="relay") == 1


def test_two_spools_textfiles_side_by_side_share_no_series(mworld: Env, listener, tmp_path):
    """The system spool's textfile and a user's spool's lie in one node_exporter folder: no
    series may be in both, or the exporter drops one and logs an error at every scrape."""
    exporter = need(NODE_EXPORTER)
    (tmp_path / "other").mkdir()
    other = Env(tmp_path / "other", listener)
    texts = []
    for w in (mworld, other):
        queue_entries(w, rcpts=("dave@example.org",))
        r = w.run("mailshim", ["metrics"])
        assert r.returncode == 0, r.stderr
        texts.append(r.stdout.decode())
    first, second = (set(parse(t)) for t in texts)
    assert first & second == set()
    assert sample(parse(texts[0]), "mailshim_info", spool=str(mworld.spool), schema="1") == 1
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "mailshim.prom").write_text(texts[0])
    (folder / "mailshim-uid1000.prom").write_text(texts[1])
    body, err = scrape(exporter, folder)
    samples = parse(body)
    assert sample(samples, "node_textfile_scrape_error") == 0
    assert b"collected before" not in err, err.decode()
    assert len([k for k in samples if k[0] == "mailshim_info"]) == 2


def test_no_textfile_when_the_option_is_off(world: Env, tmp_path):
    queue_config(world, mode="queue")
    queue_entries(world)
    assert world.run("mailshim", ["flush"]).returncode == 0
    assert not list(tmp_path.rglob("*.prom"))
    # the public summary is there all the same, readable by all, figures only
    summary = world.spool / "monitor" / "summary.json"
    assert stat.S_IMODE(summary.stat().st_mode) == 0o644
    doc = json.loads(summary.read_text())
    assert doc["schema"] == 1 and doc["queues"]["new"]["length"] == 0
    assert "example.org" not in summary.read_text()


def test_listener_down_shows_as_relay_down(mworld: Env):
    queue_entries(mworld)
    mworld.listener.stop()
    mworld.run("mailshim", ["flush"])  # 75: deferred, the listener is down
    samples = parse((mworld.textfile / "mailshim.prom").read_text())  # type: ignore[attr-defined]
    assert sample(samples, "mailshim_relay_up", relay="relay") == 0
    assert sample(samples, "mailshim_smtp_deliveries_total", status="deferred",
                  **{"class": "none"}) == 1  # fmt: skip


def test_counters_file_is_replaced_whole_and_a_bad_one_restarts(tmp_path):
    from mailshim.spool import Spool

    target = Spool(str(tmp_path / "spool"))
    target.ensure()
    mailstats.delivery("relay[127.0.0.1]:25", "sent", 250, 3.0, 1000.0)
    first = mailstats.merge(target.state_dir, mailstats.take_notes(), 1000.0)
    assert first.deliveries == {("relay", "sent", "2xx"): 1} and not first.error
    names = sorted(os.listdir(target.state_dir))
    assert names == ["metrics", "metrics.lock"]
    (Path(target.state_dir) / "metrics").write_text('{"schema": 1, "deliveries": "x"}')
    mailstats.delivery("relay", "bounced", 550, 3.0, 1001.0)
    again = mailstats.merge(target.state_dir, mailstats.take_notes(), 1001.0)
    assert again.deliveries == {("relay", "bounced", "5xx"): 1}
    assert "counting starts again" in again.error
    assert mailstats.load(target.state_dir).deliveries == {("relay", "bounced", "5xx"): 1}


def test_held_flag_matches_the_state_encoding():
    """queuestats finds held entries by the bytes encode_state writes: pinned here."""
    from mailshim.spoolfmt import State, encode_state

    state = State()
    state.last_error = '"held": true'  # a hostile text cannot fake the flag
    assert queuestats.HELD_BYTES not in encode_state(state)
    state.held = True
    assert queuestats.HELD_BYTES in encode_state(state)


def test_held_and_deferred_after_a_pass_and_from_a_fresh_process(mworld: Env):
    """The runner's pass tells the snapshot what it read (held or not); `mailshim metrics`,
    with no pass behind it, reads the states itself: both must agree."""
    ids = queue_entries(mworld, n=3)
    assert mworld.run("mailshim", ["queue", "hold", ids[0]]).returncode == 0
    mworld.listener.handler.rcpt_replies = {"bob@example.org": "451 4.3.0 try later"}
    assert mworld.run("mailshim", ["flush"]).returncode == 0
    for text in (
        (mworld.textfile / "mailshim.prom").read_text(),  # type: ignore[attr-defined]
        mworld.run("mailshim", ["metrics"]).stdout.decode(),
    ):
        samples = parse(text)
        assert sample(samples, "mailshim_queue_length", queue="held") == 1
        assert sample(samples, "mailshim_queue_length", queue="deferred") == 2
        assert sample(samples, "mailshim_queue_length", queue="new") == 0
