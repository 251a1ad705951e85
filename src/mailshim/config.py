"""The configuration's schema: every section and key with its check and its default; a parsed
TOML table in, a plain, read-only ``Config`` out.

Each key's checker converts the value as the file wrote it ("5d", "50M", ``["1m", "5m"]``) or
raises ``ValueError`` with the reason; ``apply_table`` turns that into an error naming the file,
the section and the key. A key or section the schema does not know is ignored with a warning
(``Config.warnings``): a typo must not stop mail. A relay's keys are also checked against
each other (a unix socket and ``tls = "tls"``, ``client_key`` without ``client_cert``, ...).
Finding and reading the file, its cache and the rules on who may set what live in
``configload``.

Trust: runs as every user, on a table from whatever file the caller chose (``configload``
has already taken out the settings that grant trust when root does not control the file).
Nothing here reads a file but ``RelayConfig.password``, which refuses a secret that group or
others can read.

Raises ``ConfigError`` (exit 78) naming the file, the key and the problem (the key checks raise
``ValueError``, which ``apply_table`` turns into it) and ``NoPermError`` (exit 77) for a
``password_file`` others can read.
"""

from __future__ import annotations

import os
import stat

from mailshim import paths
from mailshim.errors import ConfigError, NoPermError

# typing costs ~8 ms at start-up; mypy treats this name like typing.TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    Table = dict[str, object]

DEFAULT_RETRY = (60, 300, 900, 1800, 3600, 7200)
DEFAULT_MAX_SIZE = 50 * 1000 * 1000
TLS_MODES = ("none", "starttls", "tls")
PROTOCOLS = ("smtp", "lmtp")
FROM_MODES = ("add", "rewrite-local", "force")
DELIVERY_MODES = ("background", "interactive", "queue")
MAX_CONCURRENCY = 64


class RelayConfig:
    """One listener to hand messages to."""

    __slots__ = (
        "ca_file",
        "client_cert",
        "client_key",
        "concurrency",
        "helo",
        "host",
        "name",
        "password_file",
        "port",
        "protocol",
        "retry_after_failure",
        "socket",
        "timeout",
        "tls",
        "username",
        "verify",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.host: str | None = "127.0.0.1"
        self.port = 10025
        self.socket: str | None = None
        self.tls = "none"
        self.verify = True
        self.ca_file: str | None = None
        # A client certificate for listeners that authenticate by TLS; the key is a secret
        # like password_file (owner the runner user, mode 0600; see sealed.py).
        self.client_cert: str | None = None
        self.client_key: str | None = None
        self.username: str | None = None
        self.password_file: str | None = None
        self.timeout = 30.0
        self.helo: str | None = None
        self.protocol = "smtp"
        self.retry_after_failure = 30.0
        # Sessions a run may keep open to this relay at once (sessions.py).
        self.concurrency = 4

    def password(self) -> str | None:
        """Read the AUTH secret, refusing a file that group or others can read."""
        if self.password_file is None:
            return None
        try:
            fd = os.open(self.password_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as exc:
            raise ConfigError(
                f"[{self.name}] password_file {self.password_file}: {exc.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                raise NoPermError(
                    f"[{self.name}] password_file {self.password_file} is readable by others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
                )
            data = os.read(fd, 65536)
        finally:
            os.close(fd)
        return data.decode("utf-8", "replace").strip("\r\n")

    def describe(self) -> str:
        if self.socket:
            return f"{self.name}[{self.socket}]"
        return f"{self.name}[{self.host}]:{self.port}"


class Config:
    """The effective configuration. Treat as read-only."""

    __slots__ = (
        "_domain",
        "_trusted_domain",
        "aliases",
        "aliases_file",
        "broken",
        "delivery_mode",
        "fallback",
        "from_header",
        "helo",
        "keep_dead",
        "lifetime",
        "log_file",
        "max_recipients",
        "max_size",
        "metrics_textfile_dir",
        "path",
        "qualify_headers",
        "queue_dir",
        "relays",
        "retry",
        "sender",
        "sources",
        "stamp",
        "trusted_users",
        "user_messages",
        "user_recipients",
        "user_round_bytes",
        "user_spool_bytes",
        "user_spool_entries",
        "user_window",
        "warn_after",
        "warnings",
        "written",
    )

    def __init__(self) -> None:
        self.path: str | None = None
        self.sources: dict[str, str] = {}
        # Each value as the file wrote it ("5d", ["1m", "5m"]), for `mailshim config`.
        self.written: dict[str, object] = {}
        # Keys and sections the schema does not know: ignored, each with a warning (a typo
        # must never cost a message; Postfix warns about an unknown parameter the same way).
        self.warnings: list[str] = []
        # Set when the file is invalid and a fallback was asked for (configload.load_or_fallback):
        # why the file was not used, and what is used instead: "last good" (the last table
        # from this file that validated) or "defaults" (good enough to spool, not to deliver).
        self.broken: str | None = None
        self.fallback: str | None = None
        # The file's identity when it was read (configload.stamp): a process that lives on
        # reads the file again when it changes (configload.refresh).
        self.stamp: tuple[int, ...] | None = None
        self.relays: tuple[RelayConfig, ...] = (RelayConfig("relay"),)
        self._domain: str | None = None
        self.sender: str | None = None
        self.aliases_file: str | None = None
        self.from_header = "add"
        self.qualify_headers = True
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.queue_dir: str | None = None
        self.retry: tuple[int, ...] = DEFAULT_RETRY
        self.lifetime = 5 * 86400
        self.warn_after = 4 * 3600
        self.keep_dead = 30 * 86400  # dead letters older than this are removed
        self.delivery_mode = "background"
        self.max_size = DEFAULT_MAX_SIZE
        self.max_recipients = 10000
        self.trusted_users: tuple[str, ...] = ("root",)
        self.helo: str | None = None
        # What one submitting user (not root, not the runner) may hold in queue/ and dead/
        # together; more waits in the drop folder, on their own quota (issue 12).
        self.user_spool_entries = 10000
        self.user_spool_bytes = 2 * 1000 * 1000 * 1000
        # Bytes of entries (envelope and message) each uid may have tried per round of a
        # pass before the next uid's turn (fair.py).
        self.user_round_bytes = 256 * 1024
        self.log_file: str | None = None
        self.metrics_textfile_dir: str | None = None  # node_exporter's textfile folder
        # What one submitting uid (not root, the runner or trusted_users) gets delivered per
        # window; more waits for the next window (sendlimits.py). 0: no limit.
        self.user_messages = 100
        self.user_recipients = 500
        self.user_window = 3600
        # The domain of users' own addresses as root's configuration gives it, when the file
        # read is one the caller chose (configload); None: that file is root's own.
        self._trusted_domain: str | None = None

    @property
    def own_domain(self) -> str:
        """The domain of a user's own address as root's configuration sets it: a file the
        caller chose may send their mail under another ``domain``, but not make that
        address theirs (it gets ``X-Authentication-Warning``, as ``-f`` does)."""
        if self._trusted_domain is None:
            return self.domain
        return self._trusted_domain or paths.fqdn()

    @property
    def domain(self) -> str:
        """The default domain: configured, else this host's FQDN (looked up on first use)."""
        if self._domain is None:
            self._domain = paths.fqdn()
        return self._domain

    @property
    def helo_name(self) -> str:
        return self.relays[0].helo or self.helo or paths.fqdn()

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")

    @property
    def down_pause(self) -> float:
        """Seconds after every relay was found unreachable during which nothing more is tried
        (a burst of submissions costs no connections): the relays' ``retry_after_failure``,
        never longer than the first retry step. What is submitted meanwhile goes at its end."""
        return min(min(r.retry_after_failure for r in self.relays), float(self.retry[0]))

    def max_size_for(self, listener_size: int | None) -> int:
        """The size limit: ``[submission] max_size`` when set, else the ``SIZE`` the listener
        last announced (``Spool.listener_size``), else 50 MB."""
        if "submission.max_size" in self.sources or not listener_size:
            return self.max_size
        return listener_size


# --- value checkers: each returns the converted value or raises ValueError(reason) ---


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    if any(ch in value for ch in "\r\n\x00"):
        raise ValueError("must not contain line breaks or NUL")
    return value


def _nonempty(value: object) -> str:
    text = _str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _abs_path(value: object) -> str:
    text = _nonempty(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {_show(value)}")
    return text


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected an integer from 1 to 65535, got {_show(value)}")
    return value


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a number of seconds above 0, got {_show(value)}")
    return float(value)


def _nonneg_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a number of seconds, got {_show(value)}")
    return float(value)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a whole number above 0, got {_show(value)}")
    return value


def _nonneg_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number, 0 or more (0: no limit), got {_show(value)}")
    return value


def _positive_duration(value: object) -> int:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {_show(value)}")
        return str(value)

    return check


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def parse_duration(value: object) -> int:
    """Seconds from an integer or a string such as "90s", "15m", "4h", "5d", "1h30m".

    >>> parse_duration("1h30m")
    5400
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected a duration such as "15m", "4h" or "5d", got {_show(value)}')
    text = value.strip().lower()
    total = 0
    digits = ""
    for ch in text:
        if ch.isdigit() and ch.isascii():
            digits += ch
        elif ch in _UNITS and digits:
            total += int(digits) * _UNITS[ch]
            digits = ""
        else:
            raise ValueError(f'expected a duration such as "15m", "4h" or "5d", got {_show(value)}')
    if digits:
        total += int(digits)
    return total


def parse_size(value: object) -> int:
    """Bytes from an integer or "50M", "10MB", "1GiB", "512k"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("b")
        num = text.rstrip("kmgi")
        unit = text[len(num) :]
        if num.isdigit() and num.isascii() and unit in _SIZE_UNITS and int(num) > 0:
            return int(num) * _SIZE_UNITS[unit]
    raise ValueError(f'expected a size such as "50M" or a number of bytes, got {_show(value)}')


def _retry(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected a list of durations such as ["1m", "5m"], got {_show(value)}')
    steps = tuple(parse_duration(v) for v in value)
    if any(s <= 0 for s in steps):
        raise ValueError("every retry interval must be above 0")
    return steps


def _str_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_nonempty(value),)
    if isinstance(value, list) and value:
        return tuple(_nonempty(v) for v in value)
    raise ValueError(f"expected a string or a non-empty list of strings, got {_show(value)}")


def _concurrency(value: object) -> int:
    number = _positive_int(value)
    if number > MAX_CONCURRENCY:
        raise ValueError(f"at most {MAX_CONCURRENCY} sessions, got {number}")
    return number


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_RELAY_KEYS: dict[str, Callable[[object], object]] = {
    "name": _nonempty,
    "host": _nonempty,
    "port": _port,
    "socket": _nonempty,
    "tls": _choice(TLS_MODES),
    "verify": _bool,
    "ca_file": _nonempty,
    "client_cert": _nonempty,
    "client_key": _nonempty,
    "username": _nonempty,
    "password_file": _nonempty,
    "timeout": _positive_number,
    "helo": _nonempty,
    "protocol": _choice(PROTOCOLS),
    "retry_after_failure": _nonneg_number,
    "concurrency": _concurrency,
}

# section -> key -> (attribute on Config, checker)
SECTIONS: dict[str, dict[str, tuple[str, Callable[[object], object]]]] = {
    "addresses": {
        "domain": ("_domain", _nonempty),
        "sender": ("sender", _nonempty),
        "aliases_file": ("aliases_file", _nonempty),
        "from_header": ("from_header", _choice(FROM_MODES)),
        "qualify_headers": ("qualify_headers", _bool),
    },
    "queue": {
        "dir": ("queue_dir", _nonempty),
        "retry": ("retry", _retry),
        "lifetime": ("lifetime", parse_duration),
        "warn_after": ("warn_after", parse_duration),
        "keep_dead": ("keep_dead", parse_duration),
    },
    "delivery": {"mode": ("delivery_mode", _choice(DELIVERY_MODES))},
    "limits": {
        "user_spool_entries": ("user_spool_entries", _positive_int),
        "user_spool_bytes": ("user_spool_bytes", parse_size),
        "user_round_bytes": ("user_round_bytes", parse_size),
        "user_messages": ("user_messages", _nonneg_int),
        "user_recipients": ("user_recipients", _nonneg_int),
        "user_window": ("user_window", _positive_duration),
    },
    "log": {"file": ("log_file", _abs_path)},
    "monitoring": {"textfile_dir": ("metrics_textfile_dir", _abs_path)},
    "submission": {
        "max_size": ("max_size", parse_size),
        "max_recipients": ("max_recipients", _positive_int),
        "trusted_users": ("trusted_users", _str_list),
        "helo": ("helo", _nonempty),
    },
}


def unknown_key(where: str, section: str, key: str, known: Iterable[str]) -> str:
    """The warning for a key the schema does not know (tests/test_manpages.py reads the
    known keys back from it)."""
    return f"{where}: [{section}] unknown key {key!r} ignored (known: {', '.join(sorted(known))})"


def _build_relay(cfg: Config, table: object, name: str, where: str) -> RelayConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    relay = RelayConfig(name)
    for key, value in table.items():
        check = _RELAY_KEYS.get(key)
        if check is None:
            cfg.warnings.append(unknown_key(where, name, key, _RELAY_KEYS))
            continue
        try:
            setattr(relay, key, check(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: [{name}] {key}: {exc}") from None
    if isinstance(relay.host, str) and relay.host.startswith("[") and relay.host.endswith("]"):
        relay.host = relay.host[1:-1]
    if relay.socket is not None and "host" not in table:
        relay.host = None
    if relay.socket is not None and not relay.socket.startswith("/"):
        raise ConfigError(f"{where}: [{name}] socket: must be an absolute path")
    if relay.socket is not None and relay.tls == "tls":
        raise ConfigError(
            f'{where}: [{name}] tls = "tls" cannot be used with a unix socket: use "none"'
        )
    if relay.client_key is not None and relay.client_cert is None:
        raise ConfigError(f"{where}: [{name}] client_key is set but client_cert is not")
    if relay.client_cert is not None and relay.tls == "none":
        raise ConfigError(
            f'{where}: [{name}] client_cert needs tls = "starttls" or "tls" (it is sent in'
            " the TLS handshake)"
        )
    if relay.password_file is not None and relay.username is None:
        raise ConfigError(f"{where}: [{name}] password_file is set but username is not")
    return relay


def apply_table(cfg: Config, data: Table, where: str) -> None:
    for section, body in data.items():
        if section == "relay":
            _apply_relays(cfg, body, where)
        elif section == "aliases":
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: [aliases] must be a table")
            for name, target in body.items():
                try:
                    cfg.aliases[name.lower()] = _str_list(target)
                except ValueError as exc:
                    raise ConfigError(f"{where}: [aliases] {name}: {exc}") from None
                cfg.sources[f"aliases.{name.lower()}"] = f"file {where}"
                cfg.written[f"aliases.{name.lower()}"] = target
        elif section in SECTIONS:
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: [{section}] must be a table")
            keys = SECTIONS[section]
            for key, value in body.items():
                if key not in keys:
                    cfg.warnings.append(unknown_key(where, section, key, keys))
                    continue
                attr, check = keys[key]
                try:
                    setattr(cfg, attr, check(value))
                except ValueError as exc:
                    raise ConfigError(f"{where}: [{section}] {key}: {exc}") from None
                cfg.sources[f"{section}.{key}"] = f"file {where}"
                cfg.written[f"{section}.{key}"] = value
        else:
            known = ", ".join(sorted([*SECTIONS, "relay", "aliases"]))
            cfg.warnings.append(f"{where}: unknown section [{section}] ignored (known: {known})")


def _apply_relays(cfg: Config, body: object, where: str) -> None:
    if isinstance(body, dict):
        relay = _build_relay(cfg, body, "relay", where)
        if "name" not in body:
            relay.name = "relay"
        cfg.relays = (relay,)
        for key in [k for k in body if k in _RELAY_KEYS]:
            cfg.sources[f"relay.{key}"] = f"file {where}"
            cfg.written[f"relay.{key}"] = body[key]
    elif isinstance(body, list) and body:
        relays = []
        for i, item in enumerate(body):
            relay = _build_relay(cfg, item, f"relay {i + 1}", where)
            if not (isinstance(item, dict) and "name" in item):
                relay.name = f"relay{i + 1}"
            relays.append(relay)
            for key in [k for k in item if k in _RELAY_KEYS]:
                cfg.sources[f"relay[{i}].{key}"] = f"file {where}"
                cfg.written[f"relay[{i}].{key}"] = item[key]
        cfg.relays = tuple(relays)
    else:
        raise ConfigError(f"{where}: [relay] must be a table or a non-empty array of tables")
