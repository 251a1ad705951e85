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
