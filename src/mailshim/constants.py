"""Names shared across modules: delivery statuses and delivery modes (the ``rec_type.h``).

Plain strings, so that logs, JSON output and the spool stay readable; the constants exist so a
typo is a NameError instead of a silent mismatch.

Trust: data only. Raises nothing.
"""

from __future__ import annotations

# What became of one attempt at one entry (runner, agent, submit.Outcome).
SENT = "sent"  # every recipient accepted; the entry is removed
DEFERRED = "deferred"  # some recipients wait for their next attempt on the schedule
THROTTLED = "throttled"  # deferred by back-pressure (rate limit, greylisting): not counted
BOUNCED = "bounced"  # permanent failures reported to the sender; the entry is in dead/
REJECTED = "rejected"  # refused while the caller was listening (-odi, -bs): they were told
QUARANTINED = "quarantined"  # unreadable; moved to corrupt/
QUEUED = "queued"  # left for the agent or the runner

# [delivery] mode and -od: who delivers a new submission.
BACKGROUND = "background"  # a detached agent
INTERACTIVE = "interactive"  # sendmail itself, before it exits
QUEUE = "queue"  # nobody now: the schedule (runner, daemon, lingering agent)
