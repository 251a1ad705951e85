"""Which spool to use under a configuration: the one a submission writes to (``choose``) and
the ones this user may read (``known_spools``).

The configured (or system) spool when this process may write its queue; its drop folder when
there is one; else a per-user spool under the XDG state folder. docs/spool.md gives the table.

Trust: runs as any user, root included. Only the spools' modes and owners decide (what this
process may write, who owns the queue folder); nothing is read from inside them. A missing
spool is created only as the configured one (the system one only by root) or the user's own.

Raises: what ``Spool.ensure`` raises when a spool must be created (``CantCreateError`` 73,
or an ``OSError``'s sysexits code); as root a failure to create the configured spool is
raised rather than falling back to a per-user spool.
"""

from __future__ import annotations

import os

from mailshim import paths
from mailshim.errors import MailshimError
from mailshim.spool import Spool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailshim.config import Config


def choose(config: Config, create: bool = True) -> Spool:
    """The spool a submission writes to.

    The configured (or system) spool when this process may write its queue (root, the spool
    owner); its drop folder when there is one; else, when the spool does not exist, a
    per-user spool under the XDG state folder. A spool that exists and is ours but cannot be
    written now (read-only, full) is still returned: the write fails with the real reason
    rather than the message going somewhere no runner looks.
    """
    root = config.queue_dir or paths.SYSTEM_SPOOL
    spool = Spool(root)
    if spool.writable():
        return spool
    if spool.droppable():
        return Spool(root, drop=True)
    own = spool.owner()
    euid = os.geteuid()
    if own is not None and (euid == 0 or own[0] == euid):
        return spool
    if own is None and (euid == 0 or config.queue_dir is not None):
        try:
            if create:
                spool.ensure()
            if spool.writable():
                return spool
        except MailshimError:
            if euid == 0:
                raise
    user = Spool(paths.user_spool_dir())
    if create and not user.writable():
        user.ensure()
    return user


def known_spools(config: Config) -> list[Spool]:
    """Spools this user can read: the configured/system one and the per-user one."""
    out: list[Spool] = []
    for root in (config.queue_dir or paths.SYSTEM_SPOOL, paths.user_spool_dir()):
        spool = Spool(root)
        if os.access(spool.queue, os.R_OK | os.X_OK) and all(s.root != root for s in out):
            out.append(spool)
    return out
