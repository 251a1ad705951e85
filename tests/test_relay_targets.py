"""Relay targets end to end: `sendmail` with [[relay]] failover, LMTP, unix sockets, TLS."""

from __future__ import annotations

import os
import subprocess

from conftest import tool
from relayhelpers import Certs, Listener, free_port


def run_sendmail(tmp_path, config: str, *args: str, input: bytes = b"Subject: t\n\nbody\n"):
    cfg = tmp_path / "config.toml"
    cfg.write_text(config + f'\n[queue]\ndir = "{tmp_path / "spool"}"\n')
    env = dict(os.environ)
    env.update(
        MAILSHIM_CONFIG=str(cfg),
        MAILSHIM_CACHE_DIR=str(tmp_path / "cache"),
        MAILSHIM_NO_SYSLOG="1",
        HOME=str(tmp_path / "home"),
    )
    return subprocess.run(
        [tool("sendmail"), *args], input=input, capture_output=True, env=env, timeout=60
    )


def queued(tmp_path) -> list[str]:
    q = tmp_path / "spool" / "queue"
    return os.listdir(q) if q.exists() else []


ADDR = '[addresses]\ndomain = "example.org"\n'


def test_first_relay_down_second_takes_it(tmp_path):
    with Listener() as second:
        config = (
            f'[[relay]]\nname = "primary"\nport = {free_port()}\ntimeout = 5\n'
            f'[[relay]]\nname = "backup"\nport = {second.port}\n' + ADDR
        )
        r = run_sendmail(tmp_path, config, "-odi", "-i", "bob")
        assert r.returncode == 0, r.stderr
        assert [m.rcpt_tos for m in second.handler.messages] == [["bob@example.org"]]
        assert queued(tmp_path) == []


def test_first_relay_421_fails_over(tmp_path):
    with Listener() as first, Listener() as second:
        first.handler.script("MAIL", "421 4.3.2 shutting down")
        config = f"[[relay]]\nport = {first.port}\n[[relay]]\nport = {second.port}\n" + ADDR
        assert run_sendmail(tmp_path, config, "-odi", "-i", "bob").returncode == 0
        assert first.handler.messages == [] and len(second.handler.messages) == 1


def test_550_is_final_no_failover(tmp_path):
    with Listener() as first, Listener() as second:
        first.handler.rcpt_replies["bob@example.org"] = "550 5.1.2 Relay not allowed"
        config = f"[[relay]]\nport = {first.port}\n[[relay]]\nport = {second.port}\n" + ADDR
        r = run_sendmail(tmp_path, config, "-odi", "-i", "bob")
        assert r.returncode == 67
        assert b"550 5.1.2 Relay not allowed" in r.stderr
        assert second.handler.messages == []


def test_lmtp_over_unix_socket_with_mixed_replies(tmp_path):
    sock = str(tmp_path / "lmtp.sock")
    with Listener(unix=sock, lmtp=True) as lmtp:
        lmtp.handler.rcpt_replies["nobody@example.org"] = "550 5.1.1 unknown user"
        config = f'[relay]\nsocket = "{sock}"\nprotocol = "lmtp"\n' + ADDR
        r = run_sendmail(tmp_path, config, "-odi", "-i", "alice", "nobody")
        assert r.returncode == 67 and b"<nobody@example.org>" in r.stderr
        assert [m.rcpt_tos for m in lmtp.handler.messages] == [["alice@example.org"]]


def test_starttls_with_ca_file_verifies(tmp_path):
    certs = Certs("localhost", "127.0.0.1")
    ca = certs.ca_file(tmp_path)
    with Listener(tls="starttls", certs=certs) as lst:
        config = (
            f'[relay]\nhost = "127.0.0.1"\nport = {lst.port}\ntls = "starttls"\n'
            f'ca_file = "{ca}"\n' + ADDR
        )
        r = run_sendmail(tmp_path, config, "-odi", "-i", "bob")
        assert r.returncode == 0, r.stderr
        assert [m.tls for m in lst.handler.messages] == [True]


def test_starttls_unverified_certificate_defers(tmp_path):
    certs = Certs("localhost", "127.0.0.1")
    with Listener(tls="starttls", certs=certs) as lst:
        config = f'[relay]\nhost = "127.0.0.1"\nport = {lst.port}\ntls = "starttls"\n' + ADDR
        r = run_sendmail(tmp_path, config, "-odi", "-v", "-i", "bob")
        assert r.returncode == 0  # kept in the spool: a deferral, not a loss
        assert len(queued(tmp_path)) == 1 and lst.handler.messages == []
        assert b"certificate" in r.stderr.lower()
