"""The configuration schema (config.py): defaults, each key's check, errors naming file and key."""

from __future__ import annotations

import os

import pytest

from mailshim import config, configload, paths
from mailshim.errors import ConfigError, NoPermError


@pytest.fixture(autouse=True)
def private_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MAILSHIM_CONFIG", raising=False)
    monkeypatch.setenv("MAILSHIM_CACHE_DIR", str(tmp_path / "cache"))


def write(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_when_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "SYSTEM_CONFIG", str(tmp_path / "absent.toml"))
    cfg = configload.load()
    assert cfg.path is None
    (relay,) = cfg.relays
    assert (relay.host, relay.port, relay.tls, relay.protocol) == (
        "127.0.0.1",
        10025,
        "none",
        "smtp",
    )
    assert cfg.delivery_mode == "background" and cfg.from_header == "add"
    assert cfg.retry == (60, 300, 900, 1800, 3600, 7200) and cfg.lifetime == 5 * 86400


def test_full_file(tmp_path):
    path = write(
        tmp_path,
        """
[relay]
host = "[::1]"
port = 2525
tls = "starttls"
timeout = 5
[addresses]
domain = "example.org"
sender = "noreply@example.org"
from_header = "force"
[aliases]
root = "admin@example.org"
Ops = ["a@example.org", "b@example.org"]
[queue]
dir = "/srv/spool"
retry = ["1m", "1h30m", 7200]
lifetime = "2d"
[delivery]
mode = "queue"
[submission]
max_size = "10MiB"
""",
    )
    cfg = configload.load(path)
    assert cfg.relays[0].host == "::1" and cfg.relays[0].port == 2525
    assert cfg.domain == "example.org" and cfg.sender == "noreply@example.org"
    assert cfg.aliases == {
        "root": ("admin@example.org",),
        "ops": ("a@example.org", "b@example.org"),
    }
    assert cfg.retry == (60, 5400, 7200) and cfg.lifetime == 2 * 86400
    assert cfg.delivery_mode == "queue" and cfg.max_size == 10 * 1024 * 1024
    assert (
        cfg.source("relay.port") == f"file {path}" and cfg.source("queue.warn_after") == "default"
    )


def test_relay_array_for_failover(tmp_path):
    path = write(
        tmp_path,
        """
[[relay]]
host = "mx1.example.org"
[[relay]]
name = "backup"
socket = "/run/lmtp.sock"
protocol = "lmtp"
""",
    )
    cfg = configload.load(path)
    assert [r.name for r in cfg.relays] == ["relay1", "backup"]
    assert cfg.relays[1].host is None and cfg.relays[1].socket == "/run/lmtp.sock"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[relay]\nport = 'x'\n", r"\[relay\] port: expected an integer"),
        ("[relay]\ntls = 'yes'\n", r"tls: expected one of none, starttls, tls"),
        ("[queue]\nretry = ['1x']\n", r"\[queue\] retry: expected a duration"),
        ("[delivery]\nmode = 'fast'\n", r"\[delivery\] mode"),
        ("[relay]\nsocket = 'relative.sock'\n", r"absolute path"),
        ("[aliases]\nroot = 3\n", r"\[aliases\] root"),
        ("not toml = = \n", r"not valid TOML"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        configload.load(path)
    assert path in info.value.message
    assert info.value.code == 78


def test_password_file_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    os.chmod(secret, 0o644)
    path = write(tmp_path, f"[relay]\nusername = 'u'\npassword_file = '{secret}'\n")
    relay = configload.load(path).relays[0]
    with pytest.raises(NoPermError, match="chmod 600"):
        relay.password()
    os.chmod(secret, 0o600)
    assert relay.password() == "hunter2"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("4h", 14400), ("5d", 432000), ("1h30m", 5400), (42, 42)],
)
def test_durations(text, seconds):
    assert config.parse_duration(text) == seconds


def test_a_login_that_makes_no_address_needs_a_sender(tmp_path):
    """SSSD logins (jdoe@ad.example.com, DOM\\jdoe) make no login@domain: 78 naming
    [addresses] sender; with the key set, the same login submits."""
    from mailshim import submit

    path = tmp_path / "c.toml"
    path.write_text('[addresses]\ndomain = "example.org"\n')
    cfg = configload.load(str(path), use_cache=False)
    for login in ("jdoe@ad.example.com", "DOM\\jdoe"):
        with pytest.raises(ConfigError) as err:
            submit.default_sender(cfg, login)
        assert err.value.key == "[addresses] sender" and err.value.code == 78
        assert str(path) in err.value.message
    assert submit.default_sender(cfg, "jdoe") == "jdoe@example.org"
