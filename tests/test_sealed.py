"""Sealed set-ups: `mailshim check` says whether the listener relays for anyone on this host
and who can read the relay's secret, against real aiosmtpd listeners that do and do not
require AUTH; the pure helpers of `mailshim.sealed`.

The real-user half (a user's mail delivered by the runner, the secret out of the user's
reach, limits) is in tests/test_sealed_users.py.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess

import pytest

from conftest import tool
from mailshim import configload, sealed
from mailshim.config import Config, RelayConfig
from mailshim.errors import ConfigError
from relayhelpers import Certs, Listener
from test_check import run_check, tcp_relay, verbs, write_config

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

OPEN_WORDS = "any local process can send mail as anyone through this listener"


def secret(tmp_path, text: str = "s3cr3t", mode: int = 0o600):
    path = tmp_path / "secret"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def sealed_finding(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split()[1:2] == ["sealed"]]


def test_open_listener_is_called_open_in_plain_words(tmp_path):
    with Listener() as listener:
        r = run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)))
        doc = json.loads(
            run_check(tmp_path, write_config(tmp_path, tcp_relay(listener.port)), "--json").stdout
        )
        assert listener.handler.messages == []
    assert r.returncode == 0, r.stdout  # mail flows: open is a warning, not an error
    (line,) = sealed_finding(r.stdout)
    assert line.startswith("warning") and OPEN_WORDS in line
    assert "fix: seal it" in r.stdout and "docs/stalwart.md" in r.stdout
    assert doc["relays"][0]["sealed"] is False


def test_listener_requiring_auth_is_sealed(tmp_path):
    path = secret(tmp_path)
    with Listener(auth={"mailshim": "s3cr3t"}, auth_required=True) as listener:
        relay = tcp_relay(listener.port, f'username = "mailshim"\npassword_file = "{path}"')
        config = write_config(tmp_path, relay)
        r = run_check(tmp_path, config)
        # authenticated probe, then the bare one: MAIL refused, RSET, nothing sent
        assert verbs(listener) == [
            "EHLO", "AUTH", "MAIL", "RCPT", "RSET", "QUIT", "EHLO", "MAIL", "RSET", "QUIT",
        ]  # fmt: skip
        assert listener.handler.messages == []
        doc = json.loads(run_check(tmp_path, config, "--json").stdout)
    assert r.returncode == 0, r.stdout
    (line,) = sealed_finding(r.stdout)
    assert line.startswith("ok") and "without authentication the listener refuses (530" in line
    assert "only holders of the secret can relay" in line
    assert OPEN_WORDS not in r.stdout
    assert doc["relays"][0]["sealed"] is True
    assert f"password_file {path} (mode 0600), readable by only root" in r.stdout


def test_auth_set_up_but_listener_still_open(tmp_path):
    path = secret(tmp_path)
    with Listener(auth={"mailshim": "s3cr3t"}, auth_required=False) as listener:
        relay = tcp_relay(listener.port, f'username = "mailshim"\npassword_file = "{path}"')
        r = run_check(tmp_path, write_config(tmp_path, relay))
        rcpts = listener.handler.commands("RCPT")
        assert listener.handler.messages == []
    assert r.returncode == 0, r.stdout
    (line,) = sealed_finding(r.stdout)
    assert line.startswith("warning") and "AUTH is set up, but the listener relays" in line
    assert OPEN_WORDS in line
    assert len(rcpts) == 2  # one authenticated, one bare: never more than one refused


def test_relay_denied_without_auth_counts_as_sealed(tmp_path):
    # Stalwart with AUTH optional but relaying only for authenticated sessions: MAIL is
    # taken, RCPT refused 550 5.1.2.
    path = secret(tmp_path)
    with Listener(auth={"mailshim": "s3cr3t"}) as listener:
        listener.handler.script("RCPT", "250 2.1.5 OK", "550 5.1.2 Relay not allowed.")
        relay = tcp_relay(listener.port, f'username = "mailshim"\npassword_file = "{path}"')
        r = run_check(tmp_path, write_config(tmp_path, relay))
    assert r.returncode == 0, r.stdout
    (line,) = sealed_finding(r.stdout)
    assert line.startswith("ok") and "refuses (550 5.1.2 Relay not allowed.)" in line


def test_unreadable_secret_not_owned_by_the_runner_is_still_an_error(tmp_path):
    # Run as root, nothing is unreadable; the error path for other users is in the real-user
    # tests. Here: a secret readable by others stays refused, sealed or not.
    path = secret(tmp_path, mode=0o640)
    with Listener(auth={"mailshim": "s3cr3t"}, auth_required=True) as listener:
        relay = tcp_relay(listener.port, f'username = "mailshim"\npassword_file = "{path}"')
        r = run_check(tmp_path, write_config(tmp_path, relay))
    assert r.returncode == 77
    assert "readable by others (mode 0640)" in r.stdout


# --- the pure helpers -----------------------------------------------------------------


def _stat(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "words"),
    [
        (0o600, 0, 0, "only root"),
        (0o400, 0, 0, "only root"),
        (0o000, 0, 0, "only root"),
        (0o640, 0, 0, "root and group root"),
        (0o604, 0, 0, "everyone"),
        (0o060, 4242424, 0, "only group root"),
        (0o600, 4242424, 0, "only uid 4242424"),
    ],
)
def test_secret_holders(mode, uid, gid, words):
    assert sealed.secret_holders(_stat(mode, uid, gid)) == words


def test_sealed_out_only_for_a_secret_the_caller_cannot_read(tmp_path):
    cfg = Config()
    assert sealed.sealed_out(cfg) is False  # no secret at all
    relay = RelayConfig("relay")
    relay.username = "mailshim"
    relay.password_file = str(tmp_path / "missing")
    cfg.relays = (relay,)
    assert sealed.secret_files(relay) == [relay.password_file]
    # root reads everything: never sealed out (and a missing file is check's to report)
    assert sealed.sealed_out(cfg) is (os.geteuid() != 0)


# --- a client certificate as the secret -------------------------------------------------


class ClientCertCerts(Certs):
    """A listener that takes only clients with a certificate from its own CA."""

    def server_context(self) -> ssl.SSLContext:
        context = super().server_context()
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca.cert_pem.bytes().decode())
        return context


def client_cert_relay(tmp_path, certs: ClientCertCerts, port: int, key_mode: int = 0o600) -> str:
    client = certs.ca.issue_cert("mailshim-client.example.org")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    key.chmod(key_mode)
    return tcp_relay(
        port,
        f'tls = "tls"\nca_file = "{certs.ca_file(tmp_path)}"\n'
        f'client_cert = "{cert}"\nclient_key = "{key}"',
    )


def sendmail(tmp_path, config, *args: str):
    env = dict(os.environ, MAILSHIM_CONFIG=str(config), MAILSHIM_NO_SYSLOG="1")
    env["MAILSHIM_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run(
        [tool("sendmail"), *args],
        input=b"Subject: cert\n\nhi\n",
        capture_output=True,
        env=env,
        timeout=60,
    )


def test_client_certificate_delivers_and_its_key_seals(tmp_path):
    certs = ClientCertCerts()
    with Listener(tls="tls", certs=certs) as listener:
        config = write_config(tmp_path, client_cert_relay(tmp_path, certs, listener.port))
        r = sendmail(tmp_path, config, "-odi", "-i", "bob@example.org")
        assert r.returncode == 0, r.stderr
        assert [m.rcpt_tos for m in listener.handler.messages] == [["bob@example.org"]]
        assert listener.handler.messages[0].tls
        c = run_check(tmp_path, config)
    assert c.returncode == 0, c.stdout
    assert f"client_key {tmp_path / 'client.key'} (mode 0600), readable by only root" in c.stdout
    (line,) = sealed_finding(c.stdout)
    assert line.startswith("ok")
    assert "without a client certificate the listener refuses the TLS handshake" in line


def test_client_key_readable_by_others_is_refused(tmp_path):
    certs = ClientCertCerts()
    with Listener(tls="tls", certs=certs) as listener:
        relay = client_cert_relay(tmp_path, certs, listener.port, key_mode=0o644)
        config = write_config(tmp_path, relay)
        c = run_check(tmp_path, config)
        r = sendmail(tmp_path, config, "-odi", "-i", "bob@example.org")
        assert listener.handler.messages == []
    assert c.returncode == 77
    assert "client_key" in c.stdout and "readable by others (mode 0644)" in c.stdout
    assert r.returncode == 0, r.stderr  # kept in the spool (a deferral), never sent
    env = dict(os.environ, MAILSHIM_CONFIG=str(config), MAILSHIM_NO_SYSLOG="1")
    listing = subprocess.run([tool("mailq")], capture_output=True, text=True, env=env).stdout
    assert "readable by others" in listing


def test_client_cert_needs_tls(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[relay]\nclient_cert = "/x.pem"\n')
    with pytest.raises(ConfigError, match='client_cert needs tls = "starttls" or "tls"'):
        configload.load(str(path), use_cache=False)
    path.write_text('[relay]\ntls = "tls"\nclient_key = "/x.key"\n')
    with pytest.raises(ConfigError, match="client_key is set but client_cert is not"):
        configload.load(str(path), use_cache=False)
    relay = RelayConfig("relay")
    relay.client_cert = "/c.pem"
    assert sealed.secret_files(relay) == ["/c.pem"]  # the key in the certificate file
    relay.client_key = "/c.key"
    relay.password_file = "/p"
    assert sealed.secret_files(relay) == ["/p", "/c.key"]
