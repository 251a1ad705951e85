"""``mailshim config``: the effective configuration, each value with where it comes from.

For a person, values read as a configuration file would write them (``5d``,
``["1m", "5m", …]``, ``50M``, ``30s``): a value from the file exactly as written there, a
default or derived value in the same units. Key, value and source are aligned columns.
``--json`` keeps machine units (seconds, bytes) for scripts.

Trust: run by administrators and users on their own configuration; it only formats the
``Config`` it is given and reads the spool's ``listener-size``. Raises nothing of its own.
"""

from __future__ import annotations

import json

from mailshim import paths, spoolchoice
from mailshim.config import Config

__all__ = ["Row", "format_duration", "format_rows", "format_size", "rows"]

_RELAY_KEYS = (
    "name",
    "host",
    "port",
    "socket",
    "tls",
    "verify",
    "ca_file",
    "client_cert",
    "client_key",
    "username",
    "password_file",
    "timeout",
    "helo",
    "protocol",
    "retry_after_failure",
    "concurrency",
)
# Keys whose machine value is seconds or bytes, shown back in the file's units.
_DURATIONS = (
    "timeout", "retry_after_failure", "queue.lifetime", "queue.warn_after", "queue.keep_dead",
    "limits.user_window",
)  # fmt: skip
_SIZES = ("submission.max_size", "limits.user_spool_bytes", "limits.user_round_bytes")
_VALUE_WIDTH = 40  # a longer value pushes its source further right rather than every row


_MISSING = object()


class Row:
    """One setting: its key, its machine value (for --json), how it reads, its source."""

    __slots__ = ("key", "shown", "source", "value")

    def __init__(self, key: str, value: object, shown: str, source: str) -> None:
        self.key = key
        self.value = value
        self.shown = shown
        self.source = source


def format_duration(seconds: float) -> str:
    """Seconds as the config file writes them.

    >>> format_duration(432000), format_duration(5400), format_duration(30.0)
    ('5d', '1h30m', '30s')
    >>> format_duration(0.5)
    '0.5s'
    """
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    if rest == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            count, rest = divmod(rest, size)
            out += f"{count}{unit}"
    return out


def format_size(size: int) -> str:
    """Bytes as the config file writes them, in the largest exact unit.

    >>> format_size(50_000_000), format_size(1024 * 1024), format_size(1234)
    ('50M', '1Mi', '1234')
    """
    for unit, factor in (
        ("G", 1000**3),
        ("Gi", 1024**3),
        ("M", 1000**2),
        ("Mi", 1024**2),
        ("k", 1000),
        ("Ki", 1024),
    ):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _written(value: object) -> str:
    """A TOML value as the file wrote it: strings bare, lists with quoted strings."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return (
            "["
            + ", ".join(json.dumps(v) if isinstance(v, str) else _written(v) for v in value)
            + "]"
        )
    return str(value)


def _shown(key: str, value: object) -> str:
    """A default or derived value in the units a file would use."""
    short = key.rpartition(".")[2]
    if (key in _DURATIONS or short in _DURATIONS) and isinstance(value, (int, float)):
        return format_duration(value)
    if key in _SIZES and isinstance(value, int):
        return format_size(value)
    if key == "queue.retry" and isinstance(value, (list, tuple)):
        return _written([format_duration(v) for v in value])
    return _written(value)


def rows(cfg: Config, listener_size: int | None = None) -> list[Row]:
    """Every setting in file order; ``listener_size`` is what the spool recorded."""
    out: list[Row] = []

    def add(key: str, value: object, source: str, src_key: str | None = None) -> None:
        written = cfg.written.get(src_key or key, _MISSING)
        shown = _written(written) if written is not _MISSING else _shown(key, value)
        out.append(Row(key, value, shown, source))

    multi = len(cfg.relays) > 1
    for i, relay in enumerate(cfg.relays):
        prefix = f"relay[{i}]" if multi else "relay"
        for key in _RELAY_KEYS:
            src_key = f"{prefix}.{key}"
            add(src_key, getattr(relay, key), cfg.source(src_key))
    dom_src = cfg.source("addresses.domain")
    add("addresses.domain", cfg.domain, dom_src if dom_src != "default" else "host FQDN")
    for key in ("sender", "aliases_file", "from_header", "qualify_headers"):
        add(f"addresses.{key}", getattr(cfg, key), cfg.source(f"addresses.{key}"))
    for name, targets in sorted(cfg.aliases.items()):
        add(f"aliases.{name}", list(targets), cfg.source(f"aliases.{name}"))
    add("queue.dir", cfg.queue_dir or paths.SYSTEM_SPOOL, cfg.source("queue.dir"))
    add("queue.retry", list(cfg.retry), cfg.source("queue.retry"))
    add("queue.lifetime", cfg.lifetime, cfg.source("queue.lifetime"))
    add("queue.warn_after", cfg.warn_after, cfg.source("queue.warn_after"))
    add("queue.keep_dead", cfg.keep_dead, cfg.source("queue.keep_dead"))
    add("delivery.mode", cfg.delivery_mode, cfg.source("delivery.mode"))
    size_source = cfg.source("submission.max_size")
    max_size = cfg.max_size_for(listener_size)
    if size_source == "default" and max_size != cfg.max_size:
        size_source = "the listener's EHLO SIZE (recorded by delivery)"
    add("submission.max_size", max_size, size_source)
    add("submission.max_recipients", cfg.max_recipients, cfg.source("submission.max_recipients"))
    add("submission.trusted_users", list(cfg.trusted_users), cfg.source("submission.trusted_users"))
    add("submission.helo", cfg.helo, cfg.source("submission.helo"))
    for key in (
        "user_spool_entries", "user_spool_bytes", "user_round_bytes",
        "user_messages", "user_recipients", "user_window",
    ):  # fmt: skip
        add(f"limits.{key}", getattr(cfg, key), cfg.source(f"limits.{key}"))
    add("log.file", cfg.log_file, cfg.source("log.file"))
    return out


def spool_listener_size(cfg: Config) -> int | None:
    """The listener size recorded in the spool this user's submissions go to."""
    try:
        return spoolchoice.choose(cfg, create=False).listener_size()
    except OSError:
        return None


def format_rows(cfg: Config, table: list[Row]) -> str:
    """The aligned listing: a comment naming the file, then key, value, ``# source``."""
    lines = [f"# configuration file: {cfg.path or 'none (built-in defaults)'}"]
    key_width = max(len(r.key) for r in table)
    value_width = min(_VALUE_WIDTH, max(len(r.shown) for r in table))
    for r in table:
        lines.append(f"{r.key:<{key_width}}  {r.shown:<{value_width}}  # {r.source}")
    return "\n".join(lines) + "\n"
