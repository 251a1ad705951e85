"""`mailshim config` as a person reads it: values as written, aligned, with their sources."""

from __future__ import annotations

import doctest
import json
import subprocess

from conftest import tool
from mailshim import configview


def mailshim_config(world, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [tool("mailshim"), "config", *args], capture_output=True, env=world.env, timeout=60
    )


def table(out: bytes) -> dict[str, tuple[str, str, int]]:
    """key -> (value, source, column where "#" starts)."""
    rows = {}
    for line in out.decode().splitlines()[1:]:
        key, _, rest = line.partition(" ")
        value, _, source = rest.strip().rpartition("  # ")
        rows[key] = (value.strip(), source, line.index("  # "))
    return rows


def test_defaults_read_as_a_file_would_write_them(world):
    r = mailshim_config(world)
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows["queue.lifetime"][:2] == ("5d", "default")
    assert rows["queue.warn_after"][:2] == ("4h", "default")
    assert rows["queue.retry"][:2] == ('["1m", "5m", "15m", "30m", "1h", "2h"]', "default")
    assert rows["submission.max_size"][:2] == ("50M", "default")
    assert rows["relay.retry_after_failure"][:2] == ("30s", "default")
    assert rows["submission.helo"][:2] == ("unset", "default")
    assert rows["addresses.qualify_headers"][:2] == ("true", "default")


def test_file_values_exactly_as_written_and_comments_aligned(world):
    world.config.write_text(
        f"""
[relay]
port = {world.listener.port}
timeout = 10

[addresses]
domain = "example.org"

[aliases]
root = "admin@example.org"

[queue]
dir = "{world.spool}"
retry = ["2m", "1h30m"]
lifetime = "3d"
warn_after = 7200

[submission]
max_size = "10MiB"
"""
    )
    r = mailshim_config(world)
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    src = f"file {world.config}"
    assert rows["queue.retry"][:2] == ('["2m", "1h30m"]', src)
    assert rows["queue.lifetime"][:2] == ("3d", src)
    assert rows["queue.warn_after"][:2] == ("7200", src)  # as written: a number of seconds
    assert rows["submission.max_size"][:2] == ("10MiB", src)
    assert rows["relay.timeout"][:2] == ("10", src)
    assert rows["aliases.root"][:2] == ("admin@example.org", src)
    # One column for the sources; only a value wider than the column (the long temporary
    # spool path) pushes its own source further right.
    assert len({col for v, _s, col in rows.values() if len(v) <= 40}) == 1
    assert rows["queue.dir"][2] == max(map(len, rows)) + 2 + len(str(world.spool))
    # --json keeps machine units.
    doc = json.loads(mailshim_config(world, "--json").stdout)
    values = doc["values"]
    assert values["queue.retry"] == {"value": [120, 5400], "source": src}
    assert values["queue.lifetime"]["value"] == 3 * 86400
    assert values["submission.max_size"]["value"] == 10 * 1024 * 1024
    assert values["relay.timeout"]["value"] == 10.0
    assert values["addresses.domain"] == {"value": "example.org", "source": src}


def test_formatting_helpers():
    assert configview.format_duration(0) == "0s"
    assert configview.format_duration(90) == "1m30s"
    assert configview.format_duration(86400 + 1) == "1d1s"
    assert configview.format_size(75_000_000) == "75M"
    assert configview.format_size(2 * 1024**3) == "2Gi"
    assert configview.format_size(1000**3) == "1G"
    result = doctest.testmod(configview)
    assert result.attempted > 0 and result.failed == 0
