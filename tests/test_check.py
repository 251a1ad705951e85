"""`mailshim check`: the real command, run as a subprocess, against a real listener in each
state (up, down, relay denied, auth required, TLS with a trustme certificate, wrong password,
a unix socket, failover), plus the pure parts of `mailshim.check` (classification, the
certificate reader, finding the daemon).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailshim import check, probe
from mailshim.reply import Reply
from mailshim.x509 import parse_certificate
from relayhelpers import Certs, Listener, free_port

BIN = Path(sys.executable).parent
EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 69, 77, 78


def write_config(tmp: Path, relay: str, extra: str = "") -> Path:
    path = tmp / "config.toml"
    path.write_text(
        f"""{relay}

[addresses]
domain = "example.org"

[aliases]
root = "admin@example.org"

[queue]
dir = "{tmp / "spool"}"

[submission]
max_size = "1M"
{extra}
"""
    )
    return path


def tcp_relay(port: int, extra: str = "") -> str:
    return f"""[relay]
host = "127.0.0.1"
port = {port}
timeout = 5
helo = "client.example.org"
{extra}"""


def run_check(tmp: Path, config: Path, *args: str, env: dict[str, str] | None = None):
    environ = dict(os.environ)
    environ.update(
        MAILSHIM_CONFIG=str(config),
        MAILSHIM_CACHE_DIR=str(tmp / "cache"),
        MAILSHIM_NO_SYSLOG="1",
        HOME=str(tmp / "home"),
    )
    environ.pop("XDG_CONFIG_HOME", None)
    environ.update(env or {})
    return subprocess.run(
        [str(BIN / "mailshim"), "check", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def lines_with(text: str, level: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(level)]


def verbs(listener: Listener) -> list[str]:
    return [line.split(b" ")[0].decode().upper() for line in listener.handler.lines]


# --- listener states ----------------------------------------------------------------


def test_listener_up_mail_flows_and_nothing_is_sent(tmp_path):
    with Listener() as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ok       rcpt" in r.stdout
        assert "relaying allowed: <admin@example.org> accepted: 250 2.1.5 OK (for root)" in r.stdout
        assert "sender <" in r.stdout and "@example.org> accepted" in r.stdout
        assert "offers SIZE 33554432, 8BITMIME, SMTPUTF8" in r.stdout
        assert r.stdout.rstrip().splitlines()[-1].startswith("mail would flow")
        assert lines_with(r.stdout, "error") == []
        assert verbs(listener) == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]
        assert listener.handler.messages == []


def test_json_document(tmp_path):
    with Listener() as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mail_flows"] is True and doc["exit"] == 0
    assert {f["level"] for f in doc["findings"]} <= {"ok", "warning", "error"}
    (relay,) = doc["relays"]
    assert relay["connected"] is True and relay["outcome"] == "ok"
    assert "8BITMIME" in relay["extensions"]
    assert relay["recipients"] == [
        {"address": "admin@example.org", "for": "root", "reply": "250 2.1.5 OK", "code": 250}
    ]
    assert relay["sender"]["code"] == 250


def test_listener_down(tmp_path):
    port = free_port()
    r = run_check(tmp_path, write_config(tmp_path, tcp_relay(port)))
    assert r.returncode == EX_UNAVAILABLE
    (error,) = lines_with(r.stdout, "error")
    assert f"listener down: connection refused (relay[127.0.0.1]:{port})" in error
    assert "mail would NOT flow: 1 error" in r.stdout and "(exit 69)" in r.stdout


def test_relay_denied(tmp_path):
    with Listener() as listener:
        listener.handler.rcpt_replies["admin@example.org"] = "550 5.1.2 Relay not allowed."
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        assert r.returncode == EX_UNAVAILABLE
        (error,) = lines_with(r.stdout, "error")
        assert "relaying denied for <admin@example.org>: 550 5.1.2 Relay not allowed." in error
        fix = r.stdout.splitlines()[r.stdout.splitlines().index(error) + 1]
        assert "fix:" in fix and "allowRelaying" in fix
        assert verbs(listener) == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]


def test_auth_required_503_at_mail(tmp_path):
    with Listener() as listener:
        listener.handler.script("MAIL", "503 5.5.1 Authentication required.")
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        assert r.returncode == EX_NOPERM
        (error,) = lines_with(r.stdout, "error")
        assert "authentication required: 503 5.5.1 Authentication required." in error
        assert "MtaStageAuth.require" in r.stdout
        assert "RCPT" not in verbs(listener)  # no RCPT after a refused MAIL


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_required_530_from_a_listener_that_demands_it(tmp_path):
    with Listener(auth={"u": "p"}, auth_required=True) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
    assert r.returncode == EX_NOPERM
    assert "authentication required: 530" in r.stdout


def test_wrong_password(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    relay = f'username = "u"\npassword_file = "{secret}"'
    with Listener(auth={"u": "right"}) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port, relay)))
        assert r.returncode == EX_NOPERM
        (error,) = lines_with(r.stdout, "error")
        assert "authentication failed for u: 535" in error
        assert "MAIL" not in verbs(listener)
        secret.write_text("right\n")
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port, relay)))
        assert r.returncode == 0, r.stdout
        assert "authenticated as u" in r.stdout


def test_password_file_readable_by_others(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("right\n")
    secret.chmod(0o644)
    relay = f'username = "u"\npassword_file = "{secret}"'
    with Listener(auth={"u": "right"}) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port, relay)))
    assert r.returncode == EX_NOPERM
    first = lines_with(r.stdout, "error")[0]
    assert "readable by others (mode 0644)" in first
    assert f"chmod 600 {secret}" in r.stdout


def test_tls_verified_with_ca_file(tmp_path):
    certs = Certs()
    ca = certs.ca_file(tmp_path)
    relay = f'tls = "starttls"\nca_file = "{ca}"'
    with Listener(tls="starttls", certs=certs) as listener:
        config = write_config(tmp_path, tcp_relay(listener.port, relay))
        r = run_check(tmp_path, config)
        assert r.returncode == 0, r.stdout
        (tls,) = [line for line in r.stdout.splitlines() if line.startswith("ok       tls")]
        assert f"verified against ca_file {ca}" in tls
        assert "for localhost, 127.0.0.1, ::1" in tls and "issued by O=trustme" in tls
        doc = json.loads(run_check(tmp_path, config, "--json").stdout)
    relay_doc = doc["relays"][0]
    assert relay_doc["tls"]["verified"] is True
    assert relay_doc["tls"]["version"].startswith("TLSv1.")
    assert relay_doc["certificate"]["names"] == ["localhost", "127.0.0.1", "::1"]


def test_tls_unverified_without_ca_file(tmp_path):
    certs = Certs()
    with Listener(tls="starttls", certs=certs) as listener:
        config = write_config(tmp_path, tcp_relay(listener.port, 'tls = "starttls"'))
        r = run_check(tmp_path, config)
    assert r.returncode == EX_CONFIG
    (error,) = lines_with(r.stdout, "error")
    assert "certificate verification failed" in error
    assert "set ca_file" in r.stdout


def test_tls_verify_false_on_loopback_flows_but_says_so(tmp_path):
    certs = Certs()
    with Listener(tls="starttls", certs=certs) as listener:
        relay = tcp_relay(listener.port, 'tls = "starttls"\nverify = false')
        config = write_config(tmp_path, relay)
        r = run_check(tmp_path, config)
    assert r.returncode == 0, r.stdout
    assert "NOT verified (verify = false)" in r.stdout


def test_implicit_tls(tmp_path):
    certs = Certs()
    ca = certs.ca_file(tmp_path)
    with Listener(tls="tls", certs=certs) as listener:
        config = write_config(tmp_path, tcp_relay(listener.port, f'tls = "tls"\nca_file = "{ca}"'))
        r = run_check(tmp_path, config)
    assert r.returncode == 0, r.stdout
    assert "verified against ca_file" in r.stdout


def test_starttls_offered_but_not_used(tmp_path):
    with Listener(tls="starttls", certs=Certs()) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        assert r.returncode == 0, r.stdout
        assert 'STARTTLS offered but tls = "none"' in r.stdout
        assert "STARTTLS" not in verbs(listener)


def test_unix_socket(tmp_path):
    sock = tmp_path / "smtp.sock"
    relay = f'[relay]\nsocket = "{sock}"\ntimeout = 5\nhelo = "client.example.org"'
    with Listener(unix=str(sock)):
        r = run_check(tmp_path, write_config(tmp_path, relay))
    assert r.returncode == 0, r.stdout
    assert f"relay[{sock}] answers: 220" in r.stdout
    r = run_check(tmp_path, write_config(tmp_path, relay))  # listener gone, socket file too
    assert r.returncode == EX_UNAVAILABLE
    assert "listener down" in r.stdout


def test_extra_recipients_are_aliased_and_failures_capped(tmp_path):
    with Listener() as listener:
        for name in ("a", "b", "c", "d"):
            listener.handler.rcpt_replies[f"{name}@example.org"] = "550 5.1.1 No such user"
        args = ["--rcpt", "bob@example.net"]
        for name in ("a", "b", "c", "d"):
            args += ["--rcpt", name]
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)), *args)
        assert r.returncode == EX_UNAVAILABLE
        rcpts = [line for line in listener.handler.lines if line.upper().startswith(b"RCPT")]
        # root's alias, bob, then a b c refused: d is never tried (Stalwart's auto-ban).
        assert rcpts == [
            b"RCPT TO:<admin@example.org>",
            b"RCPT TO:<bob@example.net>",
            b"RCPT TO:<a@example.org>",
            b"RCPT TO:<b@example.org>",
            b"RCPT TO:<c@example.org>",
        ]
    assert "<a@example.org> refused: 550 5.1.1 No such user (for a)" in r.stdout
    assert "<d@example.org> not tried" in r.stdout


def test_bad_rcpt_argument_is_a_usage_error(tmp_path):
    config = write_config(tmp_path, tcp_relay(free_port()))
    r = run_check(tmp_path, config, "--rcpt", "a\tb")
    assert r.returncode == 64
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    r = run_check(tmp_path, config, "--rcpt", "a@@b")
    assert r.returncode == 65
    assert r.stderr.count("\n") == 1 and "a@@b" in r.stderr and r.stdout == ""


def test_failover_to_a_second_relay(tmp_path):
    down = free_port()
    with Listener() as listener:
        relays = f"""[[relay]]
name = "primary"
host = "127.0.0.1"
port = {down}
timeout = 5

[[relay]]
name = "backup"
host = "127.0.0.1"
port = {listener.port}
timeout = 5
"""
        r = run_check(tmp_path, write_config(tmp_path, relays))
    assert r.returncode == 0, r.stdout
    assert "listener down: connection refused" in r.stdout
    assert "(mail goes to the next relay)" in r.stdout
    assert f"mail goes to backup[127.0.0.1]:{listener.port}" in r.stdout


def test_refusing_relay_is_not_failed_over(tmp_path):
    with Listener() as first, Listener() as second:
        first.handler.rcpt_replies["admin@example.org"] = "550 5.1.2 Relay not allowed."
        relays = "\n".join(
            f'[[relay]]\nname = "r{i}"\nhost = "127.0.0.1"\nport = {lst.port}\ntimeout = 5\n'
            for i, lst in enumerate((first, second))
        )
        r = run_check(tmp_path, write_config(tmp_path, relays))
    assert r.returncode == EX_UNAVAILABLE  # a 5xx bounces: the next relay is never asked
    assert "relaying denied for <admin@example.org>" in r.stdout


def test_configuration_error(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[relay]\nport = 'twenty-five'\n")
    r = run_check(tmp_path, config)
    assert r.returncode == EX_CONFIG
    (error,) = lines_with(r.stdout, "error")
    assert "port" in error and "expected an integer" in error


def test_queue_mode_without_a_runner_is_an_error(tmp_path):
    with Listener() as listener:
        config = write_config(tmp_path, tcp_relay(listener.port), '[delivery]\nmode = "queue"')
        r = run_check(tmp_path, config)
    if check.daemon_pids() or check.unit_states():
        pytest.skip("a mailshim runner is active on this machine")
    assert r.returncode == EX_UNAVAILABLE
    assert 'delivery mode is "queue" and nothing runs the queue' in r.stdout


def test_running_daemon_is_found(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mailshim"
    fake.write_text("#!/bin/sh\ntrap 'kill $!; exit 0' TERM\nsleep 60 &\nwait\n")
    fake.chmod(0o755)
    # `sh FILE ... daemon` keeps FILE and "daemon" in /proc/PID/cmdline, as `python
    # /usr/bin/mailshim daemon` does.
    proc = subprocess.Popen(["/bin/sh", str(fake), "-C", "x.toml", "daemon"])
    try:
        with Listener() as listener:
            r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        assert f"mailshim daemon (pid {proc.pid})" in r.stdout
        assert "nothing retries" not in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def test_spool_open_to_everyone_is_a_warning(tmp_path):
    for name in ("queue", "state", "tmp"):
        (tmp_path / "spool" / name).mkdir(parents=True)
    (tmp_path / "spool").chmod(0o700)
    (tmp_path / "spool" / "queue").chmod(0o755)
    with Listener() as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
    assert r.returncode == 0
    assert f"{tmp_path / 'spool' / 'queue'} is open to other users (mode 0755)" in r.stdout


def _nobody() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no nobody user")
    return entry.pw_uid, entry.pw_gid


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up a system spool needs root")
def test_system_spool_as_set_up_is_fine_and_a_loose_drop_folder_is_not(tmp_path):
    from mailshim import spool, spoolsetup

    uid, gid = _nobody()
    spoolsetup.setup(spool.Spool(str(tmp_path / "spool")), uid, gid)
    with Listener() as listener:
        config = write_config(tmp_path, tcp_relay(listener.port))
        r = run_check(tmp_path, config)
        assert r.returncode == 0, r.stdout
        (line,) = [x for x in r.stdout.splitlines() if " spool " in x]
        assert line.startswith("ok") and "(owner root, mode 07" in line
        (tmp_path / "spool" / "incoming").chmod(0o777)
        r = run_check(tmp_path, config)
    assert "incoming is listable by other users (mode 0777)" in r.stdout
    assert "incoming lacks the sticky bit" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up a system spool needs root")
def test_secret_the_runner_cannot_read(tmp_path):
    from mailshim import spool, spoolsetup

    uid, gid = _nobody()
    spoolsetup.setup(spool.Spool(str(tmp_path / "spool")), uid, gid)
    secret = tmp_path / "secret"
    secret.write_text("right\n")
    secret.chmod(0o600)  # root's: the runner, running as nobody, cannot read it
    relay = f'username = "u"\npassword_file = "{secret}"'
    with Listener(auth={"u": "right"}) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port, relay)))
    assert r.returncode == 0, r.stdout  # root's own delivery works
    assert "but the runner runs as nobody and cannot read it" in r.stdout
    assert f"chown nobody {secret}" in r.stdout


def test_listener_smaller_than_max_size(tmp_path):
    with Listener(size_limit=1000) as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
    assert r.returncode == 0
    assert "the listener takes at most 1000 bytes" in r.stdout


# --- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "text", "code", "kind"),
    [
        (Reply(452, "4.4.5 Rate limit exceeded"), "rate limited at <a@b.c>", 69, "temporary"),
        (Reply(452, "4.2.2 Greylisted"), "greylisted", 69, "temporary"),
        (Reply(501, "5.1.3 Invalid address"), "<a@b.c> refused as invalid", 78, "permanent"),
        (Reply(550, "5.1.2 Relay not allowed."), "relaying denied for <a@b.c>", 69, "permanent"),
        (Reply(503, "5.5.1 Authentication required."), "authentication required", 77,
         "temporary"),
        (Reply(0, "lost connection"), "dropped the connection", 69, "temporary"),
    ],
)  # fmt: skip
def test_classify_rcpt(reply, text, code, kind):
    got_text, fix, got_code, got_kind = probe.classify_rcpt(reply, "a@b.c", "a@b.c")
    assert got_text.startswith(text) or text in got_text
    assert (got_code, got_kind) == (code, kind)
    assert fix


def test_daemon_command_lines():
    assert check._is_daemon_cmdline(["/usr/bin/python3", "/usr/bin/mailshim", "daemon"])
    assert check._is_daemon_cmdline(["mailshim", "-C", "/etc/x.toml", "daemon"])
    assert check._is_daemon_cmdline(["python3", "-m", "mailshim.cli.admin", "daemon"])
    assert not check._is_daemon_cmdline(["mailshim", "check"])
    assert not check._is_daemon_cmdline(["vim", "daemon", "mailshim"])


def test_certificate_reader_matches_cryptography(tmp_path):
    from cryptography import x509

    certs = Certs("localhost", "mail.example.org", "127.0.0.1", "::1")
    der = certs.cert.cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(der)
    parsed = parse_certificate(cert.public_bytes(_der_encoding()))
    assert parsed is not None
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert parsed["names"] == [str(n.value) for n in san]
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(
        tzinfo=datetime.timezone.utc
    )
    assert parsed["not_after"] == int(not_after.timestamp())
    org = cert.issuer.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value
    assert f"O={org}" in str(parsed["issuer"])


def _der_encoding():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


@given(st.binary(max_size=600))
def test_certificate_reader_never_raises(data):
    result = parse_certificate(data)
    assert result is None or isinstance(result, dict)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_certificate_reader_survives_truncation_and_garbage(tail, cut):
    der = _TRUSTME_DER[: max(0, len(_TRUSTME_DER) - cut)] + tail
    result = parse_certificate(der)
    assert result is None or isinstance(result, dict)


def _trustme_der() -> bytes:
    import ssl

    pem = Certs().cert.cert_chain_pems[0].bytes().decode()
    return ssl.PEM_cert_to_DER_cert(pem)


_TRUSTME_DER = _trustme_der()


def test_report_exit_code_is_the_first_error():
    report = check.Report()
    report.add(check.WARNING, "a", "just a warning")
    assert report.exit_code == 0 and report.mail_flows
    report.add(check.ERROR, "b", "no permission", code=77)
    report.add(check.ERROR, "c", "down", code=69)
    assert report.exit_code == 77 and not report.mail_flows
    text = check.format_report(report)
    assert text.rstrip().endswith("mail would NOT flow: 2 errors, 1 warning (exit 77)")
    assert "\x1b[" not in text and "\x1b[" in check.format_report(report, color=True)
