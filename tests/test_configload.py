"""Loading the configuration (configload.py): lookup order, the marshal cache, addresses checked at
load, which file root controls."""

from __future__ import annotations

import os
import stat

import platformdirs
import pytest

from mailshim import configload, paths
from mailshim.errors import ConfigError


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


def test_lookup_order(tmp_path, monkeypatch):
    env_file = write(tmp_path, "[addresses]\ndomain = 'env.example'\n", "env.toml")
    explicit = write(tmp_path, "[addresses]\ndomain = 'explicit.example'\n", "explicit.toml")
    user_dir = tmp_path / "home" / ".config" / "mailshim"
    user_dir.mkdir(parents=True)
    (user_dir / "config.toml").write_text("[addresses]\ndomain = 'user.example'\n")
    system = write(tmp_path, "[addresses]\ndomain = 'system.example'\n", "system.toml")
    monkeypatch.setattr(paths, "SYSTEM_CONFIG", system)
    assert configload.load().domain == "user.example"
    monkeypatch.setenv("MAILSHIM_CONFIG", env_file)
    assert configload.load().domain == "env.example"
    assert configload.load(explicit).domain == "explicit.example"
    monkeypatch.delenv("MAILSHIM_CONFIG")
    (user_dir / "config.toml").unlink()
    assert configload.load().domain == "system.example"


def test_user_dirs_match_platformdirs(monkeypatch, tmp_path):
    for value in (None, str(tmp_path / "xdg")):
        if value is None:
            monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
            monkeypatch.delenv("XDG_STATE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CONFIG_HOME", value)
            monkeypatch.setenv("XDG_STATE_HOME", value)
        assert paths.user_config_dir() == platformdirs.user_config_dir("mailshim")
        assert paths.user_state_dir() == platformdirs.user_state_dir("mailshim")


def test_cache_is_used_and_invalidated(tmp_path):
    path = write(tmp_path, "[addresses]\ndomain = 'one.example'\n")
    assert configload.load(path).domain == "one.example"
    cache = tmp_path / "cache" / "config.marshal"
    assert cache.exists() and stat.S_IMODE(cache.stat().st_mode) == 0o600
    # a cached table is revalidated: a poisoned-but-matching cache cannot skip checks
    assert configload.load(path).domain == "one.example"
    write(tmp_path, "[addresses]\ndomain = 'two.example'\n")
    assert configload.load(path).domain == "two.example"


def test_cache_writable_by_others_is_ignored(tmp_path):
    path = write(tmp_path, "[addresses]\ndomain = 'real.example'\n")
    configload.load(path)
    cache = tmp_path / "cache" / "config.marshal"
    os.chmod(cache, 0o666)
    import marshal

    key, table = marshal.loads(cache.read_bytes())
    table["addresses"]["domain"] = "evil.example"
    cache.write_bytes(marshal.dumps((key, table)))
    assert configload.load(path).domain == "real.example"


@pytest.mark.parametrize(
    "section, key, value, shown",
    [
        ("addresses", "domain", "@example.org", "[addresses] domain"),
        ("addresses", "domain", "exa mple.org", "[addresses] domain"),
        ("addresses", "domain", "example.org.", "[addresses] domain"),
        ("addresses", "sender", "two@at@example.org", "[addresses] sender"),
        ("addresses", "sender", "<>", "[addresses] sender"),
        ("aliases", "root", "not an address <", "[aliases] root"),
    ],
)
def test_unusable_addresses_are_refused_when_the_file_is_read(tmp_path, section, key, value, shown):
    """Issue 12 item 13: exit 78 naming the file, the key and the problem, at load."""
    path = tmp_path / "c.toml"
    path.write_text(f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as err:
        configload.load(str(path), use_cache=False)
    assert err.value.code == 78 and err.value.key == shown
    assert err.value.message.startswith(f"{path}: {shown}: ")


def test_sendmail_and_check_name_the_bad_key(tmp_path):
    import subprocess

    from conftest import tool

    path = tmp_path / "c.toml"
    path.write_text('[addresses]\ndomain = "@example.org"\n')
    env = {**os.environ, "MAILSHIM_CONFIG": str(path), "MAILSHIM_NO_SYSLOG": "1"}
    r = subprocess.run([tool("sendmail"), "-bv", "root"], capture_output=True, env=env)
    assert r.returncode == 78 and r.stderr.count(b"\n") == 1, r.stderr
    assert b"[addresses] domain" in r.stderr and b"root@@" not in r.stdout
    r = subprocess.run([tool("mailshim"), "check"], capture_output=True, env=env)
    assert r.returncode == 78
    assert b"fix [addresses] domain" in r.stdout + r.stderr, r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_root_controlled_files(tmp_path):
    """Only a file that root alone could have written may grant trust (issue 12, item 4)."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "c.toml"
    path.write_text("")
    os.chmod(path, 0o644)
    assert configload.root_controlled(str(path))
    os.chmod(path, 0o664)  # group-writable
    assert not configload.root_controlled(str(path))
    os.chmod(path, 0o644)
    os.chown(path, 4242, 4242)  # someone else's
    assert not configload.root_controlled(str(path))
    os.chown(path, 0, 0)
    os.chmod(tmp_path, 0o777)  # a folder anyone may swap it in
    assert not configload.root_controlled(str(path))
    os.chmod(tmp_path, 0o1777)  # sticky, like /tmp: nobody else can replace root's file
    assert configload.root_controlled(str(path))
    os.chmod(tmp_path, 0o755)


# --- a configuration problem never costs a message (issue 23, item 1) -----------------------

CRON_ARGS = ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice")
CRON_MAIL = b"From: root (Cron Daemon)\nTo: alice\nSubject: Cron <alice@host> date\n\nout\n"


def test_unknown_keys_are_warnings_and_the_rest_applies(tmp_path):
    path = write(
        tmp_path,
        '[addresses]\ndomain = "example.org"\ndomian = "typo.example"\n'
        '[relay]\nhost = "10.0.0.1"\nprot = 1\n[nope]\nx = 1\n',
    )
    cfg = configload.load(path)
    assert cfg.domain == "example.org" and cfg.relays[0].host == "10.0.0.1"
    assert len(cfg.warnings) == 3, cfg.warnings
    assert "[addresses] unknown key 'domian' ignored (known: aliases_file," in cfg.warnings[0]
    assert "[relay] unknown key 'prot' ignored" in cfg.warnings[1]
    assert "unknown section [nope] ignored" in cfg.warnings[2]
    assert "addresses.domian" not in cfg.sources and "relay.prot" not in cfg.sources


def _misspell(world) -> None:
    text = world.config.read_text()
    world.config.write_text(
        text.replace('domain = "example.org"', 'domian = "typo.example"\ndomain = "example.org"')
    )


def test_cron_mail_with_a_misspelt_key_is_delivered(world):
    _misspell(world)
    r = world.sendmail(*CRON_ARGS, input=CRON_MAIL)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert world.listener.wait(1)[0].rcpt_tos == ["alice@example.org"]
    r = world.run("mailshim", ["check"])
    out = r.stdout.decode()
    assert "[addresses] unknown key 'domian' ignored" in out, out
    assert "fix the spelling or remove the key" in out


def test_broken_file_spools_and_the_runner_uses_the_last_good_one(world):
    r = world.sendmail(*CRON_ARGS, input=CRON_MAIL)  # a good file: it becomes the last good
    assert r.returncode == 0
    world.listener.wait(1)
    world.wait_queue_empty()
    with world.config.open("a") as f:
        f.write("\n[[[ broken\n")
    lines = world.config.read_text().count("\n")
    r = world.sendmail(*CRON_ARGS, input=CRON_MAIL.replace(b"out", b"second"))
    assert r.returncode == 0 and r.stderr == b"", r.stderr  # cron's stderr is no terminal
    received = world.listener.wait(2)
    assert b"second" in received[1].data and received[1].rcpt_tos == ["alice@example.org"]
    r = world.run("mailshim", ["run"])
    assert r.returncode == 0, r.stderr
    assert b"not valid TOML" in r.stderr and b"last configuration from this file" in r.stderr
    r = world.run("mailshim", ["check"])
    assert r.returncode == 78, r.stdout
    assert f"line {lines}".encode() in r.stdout and b"until then: sendmail still spools" in r.stdout


@pytest.mark.parametrize(
    ("breakage", "rcpt"),
    [
        ("\n[[[ broken\n", None),  # not TOML: only [queue] dir can be taken from it
        ("\n[limits]\nuser_messages = -1\n", "alice@example.org"),  # one bad value
    ],
)
def test_broken_file_with_no_good_one_keeps_the_mail_until_it_is_fixed(world, breakage, rcpt):
    good = world.config.read_text()
    world.config.write_text(good + breakage)
    r = world.sendmail(*CRON_ARGS, input=CRON_MAIL)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    [qid] = world.queued()
    r = world.run("mailq", [])
    assert r.returncode == 0 and qid.encode() in r.stdout, r.stdout
    r = world.run("mailshim", ["run"])
    assert r.returncode == 78
    assert b"1 message(s) wait in " + str(world.spool).encode() in r.stderr, r.stderr
    assert world.listener.messages == [] and world.queued() == [qid]
    world.config.write_text(good)
    r = world.run("mailshim", ["run"])
    assert r.returncode == 0, r.stderr
    [got] = world.listener.wait(1)
    assert rcpt is None or got.rcpt_tos == [rcpt]
    assert world.queued() == []


def test_check_names_the_line_of_a_bad_value(tmp_path):
    path = write(tmp_path, '[addresses]\ndomain = "example.org"\n\n[queue]\nretry = ["1x"]\n')
    with pytest.raises(ConfigError) as info:
        configload.load(path)
    assert info.value.message.endswith("(line 5)"), info.value.message
