"""``mailshim check-queue`` (monplugin.py, cli/checkqueue.py): the Monitoring Plugins format
and exit codes, thresholds as ranges, the stall, an unprivileged reader of the system spool,
and a real Nagios 4 (Debian's ``nagios4-core``) running the check in its own check cycle.

Format pinned against the guidelines (https://www.monitoring-plugins.org/doc/guidelines.html):
one line ``SERVICE STATUS: text | perfdata``; perfdata ``'label'=value[UOM];warn;crit;min;max``
with UOM one of s, %, B, KB, MB, TB, c or none; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Env, others_can_run, queue_config, queue_entries, tool
from mailshim import monplugin

PERF = re.compile(r"'([^'=]+)'=(-?[0-9.]+)(s|%|B|KB|MB|TB|c)?;([^;]*);([^;]*);([^;]*);([^;]*)$")
LINE = re.compile(r"^MAILSHIM (OK|WARNING|CRITICAL|UNKNOWN): ([^|\n]+?)(?: \| (.*))?$")


def check(world: Env, *args: str, **kw) -> tuple[int, str, dict[str, tuple[str, ...]]]:
    r = world.run("mailshim", ["check-queue", *args], **kw)
    out = r.stdout.decode()
    assert r.stderr == b"", r.stderr
    assert out.endswith("\n") and out.count("\n") == 1, out  # one line, nothing else
    m = LINE.match(out.rstrip("\n"))
    assert m, out
    words = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
    assert words.index(m.group(1)) == r.returncode, out
    perf = {}
    for item in (m.group(3) or "").split(" ") if m.group(3) else []:
        pm = PERF.match(item)
        assert pm, item
        perf[pm.group(1)] = pm.groups()[1:]
    return r.returncode, out, perf


def old_entries(world: Env, seconds: float, n: int = 1) -> list[str]:
    """Entries spooled ``seconds`` ago: their queue ids (which carry the time) and arrival."""
    from mailshim import spool, spoolentry

    target = spool.Spool(str(world.spool))
    target.ensure()
    then = time.time() - seconds
    ids = []
    for _ in range(n):
        qid = spoolentry.new_queue_id(int(then * 1e9))
        w = target.new_entry("alice@example.org", ["bob@example.org"], os.getuid(),
                             queue_id=qid, arrival=int(then))  # fmt: skip
        w.write(b"Subject: old\r\n\r\nwaiting\r\n")
        w.commit(False)
        ids.append(w.queue_id)
    return ids


@pytest.mark.parametrize(
    ("text", "alerts", "quiet"),
    [
        ("10", [-1, 10.5, 11], [0, 5, 10]),
        ("10:", [9, -5], [10, 11, 1e9]),
        ("~:10", [11, 1e9], [-1e9, 0, 10]),
        ("10:20", [9, 21], [10, 15, 20]),
        ("@10:20", [10, 15, 20], [9, 21]),
    ],
)
def test_ranges_as_the_guidelines_define_them(text, alerts, quiet):
    r = monplugin.Range(text)
    assert [r.alert(v) for v in alerts] == [True] * len(alerts)
    assert [r.alert(v) for v in quiet] == [False] * len(quiet)


def test_empty_queue_is_ok_with_perfdata(world: Env):
    queue_config(world, mode="queue")
    queue_entries(world, n=0)
    code, _out, perf = check(world)
    assert code == 0
    assert set(perf) == {"waiting", "oldest", "held", "dead", "stall", "size"}
    assert perf["oldest"][:2] == ("0", "s") and perf["size"][1] == "B"
    assert perf["stall"][2:4] == ("900", "3600")  # the default stall thresholds
    assert perf["waiting"][4] == "0"  # min


def test_thresholds_on_waiting_age_and_dead(world: Env):
    queue_config(world, mode="queue")
    old_entries(world, 600, n=3)  # ten minutes: under the default stall thresholds
    code, out, perf = check(world, "-w", "2", "-c", "5")
    assert code == 1 and "waiting 3" in out and perf["waiting"][:4] == ("3", None, "2", "5")
    code, out, _ = check(world, "-w", "2", "-c", "2")
    assert code == 2
    code, out, _ = check(world, "--warning-age", "300")
    assert code == 1 and "oldest 10m" in out
    code, out, _ = check(world, "--critical-dead", "0")
    assert code == 0  # nothing dead yet
    code, out, _ = check(world, "-w", "@3:3")
    assert code == 1


def test_the_stall_is_seen(world: Env):
    """Mail waiting two hours and nothing delivered: critical by default."""
    queue_config(world, mode="queue")
    old_entries(world, 7200)
    code, out, perf = check(world)
    assert code == 2 and "nothing delivered for 2h while mail waits" in out, out
    assert int(perf["stall"][0]) >= 7200
    # delivered now: no stall any more
    assert world.run("mailshim", ["flush"]).returncode == 0
    code, out, perf = check(world)
    assert code == 0 and perf["stall"][0] == "0" and "last delivery" in out


def test_bad_arguments_are_unknown(world: Env):
    for args in (["-w", "ten"], ["--nonsense"], ["-w", "20:10"]):
        code, out, perf = check(world, *args)
        assert code == 3 and out.startswith("MAILSHIM UNKNOWN: ") and not perf, out


def test_a_range_that_is_not_a_number_is_unknown(world: Env):
    """float() takes "nan" and "inf": nan compares false with every value, so "-w nan" was a
    WARNING for good on an empty queue."""
    queue_config(world, mode="queue")
    queue_entries(world, n=0)
    assert check(world)[0] == 0
    for args in (["-w", "nan"], ["-c", "5:inf"], ["--warning-age", "@~:NaN"]):
        code, out, perf = check(world, *args)
        assert code == 3 and "is not a range" in out and not perf, out


def test_no_bar_in_the_text(world: Env, tmp_path):
    """A "|" in the text would start perfdata for Nagios: a path holding one is shown
    without it (the status line's text comes from paths and listeners' replies)."""
    code, out, perf = check(world, "--spool", str(tmp_path / "a|b"))
    assert code == 3 and out.count("|") == 0 and "a/b" in out and not perf, out


def test_a_broken_config_is_unknown(world: Env):
    world.config.write_text("[queue\n")
    code, out, _ = check(world)
    assert code == 3 and str(world.config) in out


def test_json_outputs_carry_their_schema(world: Env):
    queue_config(world, mode="queue")
    (qid,) = queue_entries(world)
    doc = json.loads(world.run("mailshim", ["queue", "--json"]).stdout)
    assert doc["schema"] == 1 and [e["id"] for e in doc["entries"]] == [qid]
    assert set(doc["entries"][0]) >= {"id", "status", "size", "arrival", "sender", "recipients"}
    doc = json.loads(world.run("mailshim", ["queue", "--dead", "--json"]).stdout)
    assert doc == {"schema": 1, "dead": []}
    doc = json.loads(world.run("mailshim", ["queue", "show", "--json", qid]).stdout)
    assert doc["schema"] == 1 and doc["entries"][0]["id"] == qid
    doc = json.loads(world.run("mailshim", ["check", "--json"]).stdout)
    assert doc["schema"] == 1 and {"mail_flows", "exit", "findings", "relays"} <= set(doc)


# --- an unprivileged monitoring user against the system spool --------------------------------


SRC = str(Path(__file__).resolve().parent.parent / "src")


def as_nobody(world: Env, spool: Path, config: Path, *args: str) -> tuple[int, str]:
    """``mailshim check-queue`` as uid 65534 (no group of the spool). Debian's own python3
    runs it when this test's interpreter is not runnable by others (a pyenv under /root):
    the check-queue path needs nothing outside the standard library."""
    if others_can_run():
        argv = [tool("mailshim")]
    elif os.access("/usr/bin/python3", os.X_OK):
        boot = (
            f"import sys; sys.path.insert(0, {SRC!r}); sys.argv[0] = 'mailshim';"
            " from mailshim.cli.entry import main; main()"
        )
        argv = ["/usr/bin/python3", "-I", "-c", boot]
    else:
        pytest.skip("no interpreter an unprivileged user may run")
    r = subprocess.run(
        [*argv, "-C", str(config), "check-queue", *args],
        user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MAILSHIM_NO_SYSLOG": "1", "HOME": "/nonexistent"},
    )  # fmt: skip
    out = r.stdout.decode()
    assert r.stderr == b"" and out.count("\n") == 1, (out, r.stderr)
    return r.returncode, out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
def test_an_unprivileged_user_reads_the_summary_only(world: Env):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mailshim-mon-"))
    try:
        os.chmod(base, 0o755)
        spool = base / "spool"
        config = base / "mailshim.toml"
        config.write_text(world.config.read_text().replace(str(world.spool), str(spool)))
        os.chmod(config, 0o644)
        world.env["MAILSHIM_CONFIG"] = str(config)
        world.spool = spool
        r = world.run("mailshim", ["setup-spool", "--user", "root"])
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(os.stat(spool).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(spool / "queue").st_mode) == 0o700
        # no summary yet: UNKNOWN, saying what is missing
        code, out = as_nobody(world, spool, config)
        assert code == 3 and "no runner has published" in out, out
        queue_entries(world, rcpts=("secret-person@example.org",), n=2)
        assert world.run("mailshim", ["queue", "hold", "--all"]).returncode == 0
        assert world.run("mailshim", ["run"]).returncode == 0  # a pass publishes the figures
        code, out = as_nobody(world, spool, config, "--critical-held", "1")
        assert code == 2 and "'held'=2;;1;0;" in out, out
        assert "secret-person" not in out and "example.org" not in out
        # the user really cannot read the queue: it was the summary
        r = subprocess.run(["ls", str(spool / "queue")], user=65534, capture_output=True)
        assert r.returncode != 0
        # mail arriving after the last pass counts as waiting though no pass has seen it
        summary = spool / "monitor" / "summary.json"
        doc = json.loads(summary.read_text())
        doc["written"] = time.time() - 3 * 3600
        summary.write_text(json.dumps(doc))
        queue_entries(world)  # queue/ changes now, hours after the summary
        code, out = as_nobody(world, spool, config, "-w", "0")
        # waiting, and since the summary at most: a runner silent for hours is a stall
        assert code == 2 and "'waiting'=1;0;;0;" in out and "nothing delivered for 3h" in out, out
    finally:
        shutil.rmtree(base)


# --- a real Nagios 4 runs the check ----------------------------------------------------------

NAGIOS_OBJECTS = """
define timeperiod {{
    timeperiod_name always
    alias always
    sunday 00:00-24:00
    monday 00:00-24:00
    tuesday 00:00-24:00
    wednesday 00:00-24:00
    thursday 00:00-24:00
    friday 00:00-24:00
    saturday 00:00-24:00
}}
define command {{
    command_name check_host_alive
    command_line /bin/echo "UP"
}}
define command {{
    command_name check_mailshim_queue
    command_line {mailshim} -C {config} check-queue $ARG1$
}}
define command {{
    command_name notify_nobody
    command_line /bin/true
}}
define contact {{
    contact_name nobody
    host_notifications_enabled 0
    service_notifications_enabled 0
    host_notification_period always
    service_notification_period always
    host_notification_options n
    service_notification_options n
    host_notification_commands notify_nobody
    service_notification_commands notify_nobody
}}
define host {{
    host_name mailhost
    address 127.0.0.1
    check_command check_host_alive
    max_check_attempts 1
    check_period always
    contacts nobody
    notification_period always
}}
define service {{
    host_name mailhost
    service_description mailshim queue
    check_command check_mailshim_queue!-w 1 -c 5
    max_check_attempts 1
    check_interval 1
    retry_interval 1
    check_period always
    contacts nobody
    notification_period always
}}
"""


def test_nagios4_runs_the_check(world: Env, tmp_path):
    nagios = shutil.which("nagios4")
    if nagios is None:
        if os.environ.get("MAILSHIM_REQUIRE_MONITORING_TOOLS"):
            pytest.fail("nagios4 is not installed (.ci/monitoring-tools.sh installs it)")
        pytest.skip("nagios4 is not installed (apt-get install nagios4-core)")
    queue_config(world, mode="queue")
    queue_entries(world, n=3)
    here = tmp_path / "nagios"
    (here / "results").mkdir(parents=True)
    (here / "objects.cfg").write_text(
        NAGIOS_OBJECTS.format(mailshim=tool("mailshim"), config=world.config)
    )
    user = "root" if os.geteuid() == 0 else str(os.getuid())
    (here / "nagios.cfg").write_text(f"""
log_file={here}/nagios.log
cfg_file={here}/objects.cfg
status_file={here}/status.dat
status_update_interval=1
check_result_path={here}/results
lock_file={here}/nagios.lock
temp_file={here}/nagios.tmp
temp_path={here}
state_retention_file={here}/retention.dat
retain_state_information=0
check_external_commands=0
nagios_user={user}
nagios_group={user}
interval_length=1
enable_notifications=0
log_initial_states=1
object_cache_file={here}/objects.cache
precached_object_file={here}/objects.precache
""")
    verify = subprocess.run([nagios, "-v", str(here / "nagios.cfg")], capture_output=True)
    assert verify.returncode == 0, verify.stdout
    env = dict(world.env)
    proc = subprocess.Popen([nagios, str(here / "nagios.cfg")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        alert, block = "", ""
        while not (alert and "\tperformance_data='" in block):
            assert proc.poll() is None and time.monotonic() < deadline, "nagios ran no check"
            time.sleep(0.2)
            log = (here / "nagios.log").read_text() if (here / "nagios.log").exists() else ""
            alert = next((ln for ln in log.splitlines() if "SERVICE ALERT: mailhost;" in ln), "")
            status = (here / "status.dat").read_text() if (here / "status.dat").exists() else ""
            block = status[status.find("servicestatus {") :] if "servicestatus {" in status else ""
    finally:
        proc.terminate()
        proc.wait(20)
    # 3 waiting against -w 1 -c 5: WARNING, as Nagios read it from the exit code and the line
    assert ";mailshim queue;WARNING;HARD;1;MAILSHIM WARNING: waiting 3 - 3 waiting" in alert
    assert "\tcurrent_state=1\n" in block
    assert "\tperformance_data='waiting'=3;1;5;0; 'oldest'=" in block


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
def test_a_stopped_runner_on_a_busy_host_is_a_stall(world: Env):
    """The runner's last pass was three hours ago and mail kept coming: the first unseen entry
    two hours ago, the latest just now. The reader cannot list queue/, so it only knows that
    queue/ changed after the summary; that mail has waited since the summary at most, and
    nothing can have been delivered since (a pass would have written a new one). Counting
    the unseen mail from the latest change said OK for as long as mail kept arriving."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mailshim-mon-"))
    try:
        os.chmod(base, 0o755)
        spool = base / "spool"
        config = base / "mailshim.toml"
        config.write_text(world.config.read_text().replace(str(world.spool), str(spool)))
        os.chmod(config, 0o644)
        world.env["MAILSHIM_CONFIG"] = str(config)
        world.spool = spool
        assert world.run("mailshim", ["setup-spool", "--user", "root"]).returncode == 0
        queue_entries(world)
        assert world.run("mailshim", ["run"]).returncode == 0  # delivered, figures published
        code, out = as_nobody(world, spool, config)
        assert code == 0 and "'waiting'=0;" in out, out
        # the runner stops; its last summary (and last delivery) are three hours old
        summary = spool / "monitor" / "summary.json"
        doc = json.loads(summary.read_text())
        doc["written"] = doc["last_delivery"] = time.time() - 3 * 3600
        summary.write_text(json.dumps(doc))
        old_entries(world, 2 * 3600)  # unseen since two hours
        queue_entries(world)  # and more mail now: queue/ changed a moment ago
        code, out = as_nobody(world, spool, config)
        assert code == 2 and "nothing delivered for 3h while mail waits" in out, out
    finally:
        shutil.rmtree(base)
