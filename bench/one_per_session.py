"""Flush a spool the way a client without connection reuse would: one SMTP session per message.

The comparison point for ``mailshim flush`` (issue 3's benchmark): the same runner code, the
same spool work, but a ``RelayClient`` that QUITs after every message, so that every message
pays for connect, greeting, EHLO and QUIT. This script swaps ``runner._client`` for it; it
relies on ``runner._client``, ``runner.flush`` and ``spoolchoice.known_spools`` keeping their
current shapes.

Usage: python bench/one_per_session.py CONFIG   (prints "sent deferred bounced")

Trust: a benchmark tool, run by hand on the bench's own spool.
"""

from __future__ import annotations

import sys

from mailshim import config as config_mod
from mailshim import runner, spoolchoice
from mailshim.relay import RelayClient


class _OneMessageClient(RelayClient):
    async def send(self, *args, **kwargs):
        try:
            return await super().send(*args, **kwargs)
        finally:
            await self.close()


def _one_message_client(config, transcript=None):
    return _OneMessageClient(config.relays, helo=config.helo_name, transcript=transcript)


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: one_per_session.py CONFIG\n")
        return 64
    runner._client = _one_message_client
    config = config_mod.load(sys.argv[1])
    spools = [s for s in spoolchoice.known_spools(config) if s.writable()]
    counts = runner.flush(config, spools)
    print(counts.sent, counts.deferred, counts.bounced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
