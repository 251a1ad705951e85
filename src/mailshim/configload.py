"""Find and read the configuration file, with its marshal cache and the rules on which file
may grant trust; ``config`` checks what the file says.

Lookup order: ``-C FILE``, ``$MAILSHIM_CONFIG``, the per-user file (when it exists),
``/etc/mailshim/config.toml``, built-in defaults. Only the first file found is read: files
are not merged, so what ``mailshim config`` shows is the whole story.

Parsing TOML costs more than the rest of ``sendmail`` start-up (``tomllib`` pulls in ``re``,
``typing`` and ``datetime``), so the parsed table is cached with ``marshal`` in the caller's
cache folder, keyed on the file's identity (device, inode, size, mtime, ctime). The cache is
only trusted when it and its folder belong to the caller (or root) and nobody else can write
them; the table read from it is validated again like a freshly parsed one.

Trust: runs as every user. The file named by ``-C`` or ``$MAILSHIM_CONFIG`` is the caller's
choice and only affects the caller's own submission; the settings that grant trust
(``TRUST_KEYS``) are taken only from a file that root controls, else from the system file.

Raises ``ConfigError`` (exit 78) naming the file, the key and the problem: a file that cannot
be read, is not a regular file, UTF-8 or TOML, a value ``config`` refuses, or an address that
cannot be used.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

from mailshim import config, paths
from mailshim.errors import ConfigError

# typing costs ~8 ms at start-up; mypy treats this name like typing.TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Table

_CACHE_VERSION = 1


def find_config_file(explicit: str | None) -> tuple[str | None, str]:
    """The file to read and why it was chosen ("-C", "environment", "user", "system")."""
    if explicit:
        return explicit, "-C"
    env = os.environ.get("MAILSHIM_CONFIG")
    if env:
        return env, "$MAILSHIM_CONFIG"
    user = os.path.join(paths.user_config_dir(), "config.toml")
    if os.path.exists(user):
        return user, "user"
    if os.path.exists(paths.SYSTEM_CONFIG):
        return paths.SYSTEM_CONFIG, "system"
    return None, "defaults"


def load(explicit: str | None = None, *, use_cache: bool = True) -> config.Config:
    """Find and read the configuration. Raises ``ConfigError`` (exit 78) naming the problem.

    Keys the schema does not know are ignored, each with a line in ``Config.warnings``; they
    are logged when the file is parsed afresh (once per change of the file, not per run)."""
    path, _why = find_config_file(explicit)
    if path is None:
        return config.Config()
    seen = stamp(path)  # before the read: a change after it is seen by the next refresh
    data, pending = _read_table(path, use_cache)
    cfg = _validated(path, data, use_cache)
    cfg.stamp = seen
    _use_log_file(cfg)
    if pending is not None:
        # Only a table that validated is cached: the cache is also the last good
        # configuration that load_or_fallback returns to when the file breaks.
        _cache_put(*pending, data)
        if cfg.warnings:
            from mailshim import maillog

            for warning in cfg.warnings:
                maillog.log(f"warning: {warning}", error=True)
    return cfg


def _validated(path: str, data: Table, use_cache: bool) -> config.Config:
    cfg = config.Config()
    cfg.path = path
    if os.geteuid() != 0 and not root_controlled(path):
        data = _without_trust(cfg, data, path)
        _trust_from_system(cfg, path, use_cache)
        cfg._trusted_domain = _system_domain(use_cache)
    try:
        config.apply_table(cfg, data, path)
    except ConfigError as exc:
        raise ConfigError(_with_line(exc.message, path), exc.key) from None
    _check_addresses(cfg, path)
    return cfg


def _use_log_file(cfg: config.Config) -> None:
    if cfg.log_file is not None:
        from mailshim import maillog

        maillog.use_file(cfg.log_file)


def load_or_fallback(explicit: str | None = None) -> config.Config:
    """``load``, except that an invalid file costs no mail: the caller gets the last
    configuration that validated from this file (this user's cache), else the built-in
    defaults, with ``Config.broken`` saying why the file was not used. A caller that sends
    mail checks ``usable`` first: the defaults are good enough to spool, never to deliver."""
    seen = stamp(find_config_file(explicit)[0])
    try:
        return load(explicit)
    except ConfigError as exc:
        problem = exc.message
    path, _why = find_config_file(explicit)
    cfg = _last_good(path) if path is not None else None
    if cfg is None:
        cfg = config.Config()
        cfg.path = path
        cfg.fallback = "defaults"
        if path is not None:
            if os.path.abspath(path) == paths.SYSTEM_CONFIG:
                probe = config.Config()
                _salvage(probe, path)
                _published(cfg, probe.queue_dir or paths.SYSTEM_SPOOL)
            _salvage(cfg, path)  # what the broken file still says wins over the copy
    else:
        cfg.fallback = "last good"
    cfg.broken = problem
    cfg.stamp = seen
    _use_log_file(cfg)
    return cfg


def stamp(path: str | None) -> tuple[int, ...] | None:
    """The identity of the file at ``path`` now (device, inode, size, mtime, ctime; ``()``
    when it cannot be looked at), for ``refresh``; None without a file."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def refresh(cfg: config.Config, who: str) -> config.Config:
    """For a process that lives on (the delivery agent, a user's drop agent, the daemon):
    ``cfg`` while its file is unchanged, else the file read again. An administrator who
    fixes the relay must not wait for such a process to leave, which it never does while
    the old relay refuses the mail it retries. A changed file that is invalid leaves ``cfg``
    in use (the last good configuration, in memory), said once in the log."""
    if cfg.path is None or stamp(cfg.path) == cfg.stamp:
        return cfg
    from mailshim import maillog
    from mailshim.errors import MailshimError

    seen = stamp(cfg.path)
    try:
        new = load_or_fallback(cfg.path)
    except MailshimError as exc:  # never the end of a process that is retrying mail
        new = config.Config()
        new.broken, new.stamp = exc.message, seen
    if new.broken is not None:
        maillog.log(
            f"error: {new.broken}; {who} keeps the configuration it read before until the"
            " file is fixed",
            error=True,
        )
        cfg.stamp = new.stamp  # said once per change of the file
        return cfg
    maillog.log(f"{who}: {cfg.path} changed: read again")
    return new


def usable(cfg: config.Config) -> bool:
    """Whether mail may be delivered with ``cfg``: a valid file, or the last good one."""
    return cfg.broken is None or cfg.fallback == "last good"


def fallback_note(cfg: config.Config) -> str:
    """What is used instead of a broken file, for the loud line every user of it logs."""
    if usable(cfg):
        return "using the last configuration from this file that was valid until it is fixed"
    if cfg.fallback == "published":
        return (
            "addresses as the runner's copy of its last valid version says; mail is kept in"
            " the spool and the runner delivers it"
        )
    return (
        "no earlier configuration from this file was valid here: mail is kept in the spool"
        " and delivered once the file is fixed"
    )


def announce(cfg: config.Config) -> str | None:
    """Log the broken file and what is done instead (an error line in syslog or the log
    file); the same line for the caller to show, or None when the file is fine."""
    if cfg.broken is None:
        return None
    from mailshim import maillog

    line = f"{cfg.broken}; {fallback_note(cfg)}"
    maillog.log(f"error: {line}", error=True)
    return line


def _salvage(cfg: config.Config, path: str) -> None:
    """Take from a broken file what can be taken, key by key, so that a message spooled
    meanwhile lands in the spool the runner will read (``[queue] dir``) and is addressed as
    the file means it (domain, aliases). Never grants trust (``TRUST_KEYS``) and never makes
    ``cfg`` usable for delivery: that takes a file that validates whole."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * 1024 * 1024)
    except OSError:
        return
    try:
        data = _parse_toml(raw, path)
    except ConfigError:
        cfg.queue_dir = _queue_dir_line(raw) or cfg.queue_dir
        return
    for name, body in _without_trust(config.Config(), data, path).items():
        parts = (
            body.items() if isinstance(body, dict) and name not in ("relay",) else [(None, body)]
        )
        for key, value in parts:
            piece = {name: value if key is None else {key: value}}
            trial = config.Config()
            try:
                config.apply_table(trial, piece, path)
                _check_addresses(trial, path)
            except ConfigError:
                continue
            config.apply_table(cfg, piece, path)


# What a user's sendmail takes from the runner's copy of the last valid system file: how
# her message is addressed and sized. Never the spool, the log file, the relays or trust: a
# copy the runner account wrote may not aim root's sendmail at a path, and a configuration
# taken from it is never used to deliver (``usable`` stays false: the runner delivers).
_PUBLISHED = {
    "addresses": ("domain", "from_header", "qualify_headers"),
    "aliases": None,
    "submission": ("max_size", "max_recipients", "helo"),
}


def _published(cfg: config.Config, spool_root: str) -> None:
    """The system file is broken and this user has no last good table of it: take the
    addressing from the runner's copy of the last valid one (``status/config.toml``,
    ownview.publish_config), so that ``bob`` does not become ``bob@<this host>``."""
    copy = os.path.join(spool_root, "status", "config.toml")
    try:
        owners = {0, os.lstat(os.path.join(spool_root, "queue")).st_uid}
        fd = os.open(copy, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in owners:
            return
        if st.st_mode & 0o022:
            return
        raw = os.read(fd, 1024 * 1024 + 1)
    except OSError:
        return
    finally:
        os.close(fd)
    if len(raw) > 1024 * 1024:
        return
    try:
        data = _parse_toml(raw, copy)
    except ConfigError:
        return
    table: Table = {}
    for section, keys in _PUBLISHED.items():
        body = data.get(section)
        if isinstance(body, dict):
            table[section] = body if keys is None else {k: v for k, v in body.items() if k in keys}
    where = f"{copy} (the runner's copy of the last valid {paths.SYSTEM_CONFIG})"
    trial = config.Config()
    try:
        config.apply_table(trial, table, where)
        _check_addresses(trial, where)
    except ConfigError:
        return
    config.apply_table(cfg, table, where)
    cfg.fallback = "published"


def check_bytes(raw: bytes, path: str) -> None:
    """Raise ``ConfigError`` unless ``raw`` is a configuration that validates (the runner,
    before it publishes a copy of the system file: ownview.publish_config)."""
    data = _parse_toml(raw, path)
    trial = config.Config()
    config.apply_table(trial, data, path)
    _check_addresses(trial, path)


def _queue_dir_line(raw: bytes) -> str | None:
    """``[queue] dir`` from a file that is not TOML: a plain ``dir = "/path"`` line."""
    import re

    section, found = "", None
    for line in raw.decode("utf-8", "replace").splitlines():
        text = line.strip()
        if text.startswith("["):
            section = text.strip("[] ")
        match = re.fullmatch(r'dir\s*=\s*"(/[^"\\]*)"\s*(#.*)?', text)
        if section == "queue" and match:
            found = match.group(1)
    return found


def _last_good(path: str) -> config.Config | None:
    cache_file = _cache_path()
    stored = _cache_get(cache_file, None)
    if stored is None or stored[0][2] != os.path.abspath(path):
        return None
    try:
        cfg = _validated(path, stored[1], True)
    except ConfigError:
        return None  # valid under an older mailshim, not this one
    return cfg


def _with_line(message: str, path: str) -> str:
    """Add the line of the key a message names ("[queue] retry: ..."): ``check`` and the
    logs then point at the line to fix, as TOML syntax errors already do."""
    import re

    found = re.search(r"\[([^\]]+)\] (\w+)[:]", message)
    if found is None:
        return message
    section, key = found.group(1), found.group(2)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(4 * 1024 * 1024).splitlines()
    except OSError:
        return message
    current = ""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text.startswith("["):
            current = text.strip("[] ")
        elif current in (section, section.split(" ")[0]) and re.match(
            rf"[\"']?{re.escape(key)}[\"']?\s*=", text
        ):
            return f"{message} (line {number})"
    return message


# Settings that grant trust: who may choose any sender without a warning, and one sender for
# everyone. A file the caller chose (-C, $MAILSHIM_CONFIG, their own per-user file) could
# otherwise make anyone trusted; so they are read only from a file that root controls, and
# else from the system configuration (issue 12, item 4).
TRUST_KEYS = (("submission", "trusted_users"), ("addresses", "sender"))


def root_controlled(path: str) -> bool:
    """Only root can have written ``path``: it and every folder above it belong to root,
    and none is writable by group or others (a sticky folder such as /tmp excepted)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
        folder = os.path.dirname(real)
        while True:
            st = os.stat(folder)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                return False
            if folder == os.path.dirname(folder):
                return True
            folder = os.path.dirname(folder)
    except OSError:
        return False


def _without_trust(cfg: config.Config, data: Table, where: str) -> Table:
    out = dict(data)
    for section, key in TRUST_KEYS:
        body = out.get(section)
        if isinstance(body, dict) and key in body:
            out[section] = {k: v for k, v in body.items() if k != key}
            cfg.sources[f"{section}.{key}"] = (
                f"ignored in {where} (only a file root controls may set it)"
            )
    return out


def _system_domain(use_cache: bool) -> str:
    """``[addresses] domain`` of the system configuration when root controls it, else ""
    (the built-in default, this host's name): what users' own addresses are, whatever a
    file they chose says (issue 24, item 3)."""
    system = paths.SYSTEM_CONFIG
    if not os.path.exists(system) or not root_controlled(system):
        return ""
    try:
        body = _read_table(system, use_cache)[0].get("addresses")
    except ConfigError:
        return ""
    value = body.get("domain") if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else ""


def _trust_from_system(cfg: config.Config, where: str, use_cache: bool) -> None:
    system = paths.SYSTEM_CONFIG
    if where == system or not os.path.exists(system) or not root_controlled(system):
        return
    data, _pending = _read_table(system, use_cache)
    for section, key in TRUST_KEYS:
        body = data.get(section)
        if isinstance(body, dict) and key in body:
            attr, check = config.SECTIONS[section][key]
            try:
                setattr(cfg, attr, check(body[key]))
            except ValueError as exc:
                raise ConfigError(
                    f"{system}: [{section}] {key}: {exc}", f"[{section}] {key}"
                ) from None
            cfg.sources[f"{section}.{key}"] = f"file {system}"


def _check_addresses(cfg: config.Config, where: str) -> None:
    """Addresses in the file must be usable before anything is sent (issue 12, item 13)."""
    if cfg._domain is None and cfg.sender is None and not cfg.aliases:
        return
    from mailshim import aliases  # pure, and sendmail imports it anyway

    problem = aliases.settings_problem(cfg._domain, cfg.sender, cfg.aliases)
    if problem is not None:
        key, why = problem
        raise ConfigError(f"{where}: {key}: {why}", key)


def _read_table(path: str, use_cache: bool) -> tuple[Table, tuple[str, tuple[object, ...]] | None]:
    """The parsed table, and where to cache it once it validates (None: it came from the
    cache, or there is no cache)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the configuration is not a regular file")
        key = (
            _CACHE_VERSION,
            sys.version_info[:2],
            os.path.abspath(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        cache_file = _cache_path() if use_cache else None
        if cache_file is not None:
            cached = _cache_get(cache_file, key)
            if cached is not None:
                return cached[1], None
        raw = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            raw += chunk
            if len(raw) > 4 * 1024 * 1024:
                raise ConfigError(f"{path}: the configuration is larger than 4 MiB")
    finally:
        os.close(fd)
    data = _parse_toml(raw, path)
    return data, (None if cache_file is None else (cache_file, key))


def _parse_toml(raw: bytes, path: str) -> Table:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _cache_path() -> str:
    base = os.environ.get("MAILSHIM_CACHE_DIR") or paths.user_cache_dir()
    return os.path.join(base, "config.marshal")


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _root_path(folder: str, create: bool) -> bool:
    """For root: whether no other account can change what ``folder`` names. Every component
    from ``/`` down is looked at with ``lstat`` (a link anywhere refuses it: ``os.stat`` of the
    folder would follow one a user planted in a folder of theirs above it) and must be a
    folder of root's, writable by nobody else (a sticky folder excepted on the way, since what
    it holds is then root's and cannot be renamed by others). With ``create``, missing folders
    are made (0700), one at a time: ``mkdir`` never follows a link at its last component.

    Root's cache folder lies under whatever HOME or XDG_CACHE_HOME it was started with, which
    ``sudo -E``, ``su -m`` or ``su`` (XDG_CACHE_HOME) take from a user (issue 24, item 1)."""
    parts = [p for p in os.path.abspath(folder).split("/") if p]
    path = "/"
    for i in range(len(parts) + 1):
        if i:
            path = os.path.join(path, parts[i - 1])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return False
            try:
                os.mkdir(path, 0o700)
                st = os.lstat(path)
            except OSError:
                return False
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return False
        if st.st_mode & 0o022 and (i == len(parts) or not st.st_mode & stat.S_ISVTX):
            return False
    return True


def _cache_get(
    cache_file: str, key: tuple[object, ...] | None
) -> tuple[tuple[object, ...], Table] | None:
    """The cached (key, table) when it matches ``key`` (any key: None), else None."""
    if os.geteuid() == 0 and not _root_path(os.path.dirname(cache_file), create=False):
        return None
    try:
        dst = os.stat(os.path.dirname(cache_file))
        fd = os.open(cache_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _trusted(st) and _trusted(dst)):
            return None
        if st.st_size > 8 * 1024 * 1024:
            return None
        blob = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            blob += chunk
        stored = marshal.loads(blob)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)
    if (
        isinstance(stored, tuple)
        and len(stored) == 2
        and isinstance(stored[0], tuple)
        and len(stored[0]) == 8
        and (
            stored[0] == key
            if key is not None
            else stored[0][:2] == (_CACHE_VERSION, sys.version_info[:2])
        )
        and isinstance(stored[1], dict)
    ):
        return stored[0], stored[1]
    return None


def _cache_put(cache_file: str, key: tuple[object, ...], data: Table) -> None:
    """Best effort: a cache that cannot be written only costs the next run some milliseconds."""
    try:
        # marshal's stub lists concrete types; the table holds only TOML's plain values.
        blob = marshal.dumps((key, data))  # type: ignore[arg-type]
    except ValueError:
        return  # a TOML date or time value: not marshal-able, and rejected by validation anyway
    folder = os.path.dirname(cache_file)
    if os.geteuid() == 0 and not _root_path(folder, create=True):
        return
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # Root never writes into a cache folder another account controls (the units' is
        # the runner's): it would not read it back anyway (_cache_get), and writes nothing
        # there that account could aim elsewhere.
        if not _trusted(os.stat(folder)):
            return
    except OSError:
        return
    paths.replace_file(cache_file, blob, 0o600)
