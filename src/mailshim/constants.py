"""The project's named values in one place (after Postfix's rec_type.h): statuses, modes, keys.

Plain string constants, not an ``enum``: the ``sendmail`` fast path may import this module
and must not import ``enum`` (tests/test_imports.py). The values are what the spool, the logs
and ``--json`` output already hold, so code that still spells them out keeps working while
modules adopt the names. The failure kinds of a missing reply (``refused``, ``timeout``...)
belong to ``reply``, beside the value that carries them.

Trust: pure data; imports nothing. Raises nothing.
"""

from __future__ import annotations

# --- how sendmail hands a message on ([delivery] mode, -odb/-odi/-odq) ----------------------
BACKGROUND = "background"  # spool, then an agent delivers while the caller goes on
INTERACTIVE = "interactive"  # spool, then deliver before exiting (-odi)
QUEUE = "queue"  # spool only; the runner delivers (-odq)
DELIVERY_MODES = (BACKGROUND, INTERACTIVE, QUEUE)

# --- what became of one entry after one attempt (runner, submit, bs, logs) -----------------
QUEUED = "queued"  # in the spool, not tried yet
SENT = "sent"  # every recipient accepted; the entry is removed
DEFERRED = "deferred"  # some recipient waits for the next attempt
THROTTLED = "throttled"  # deferred by back-pressure (rate limit, greylisting): not counted
BOUNCED = "bounced"  # refused for good; a report went to the sender; moved to dead/
REJECTED = "rejected"  # refused for good, and the caller was told at once (-odi, -bs)
QUARANTINED = "quarantined"  # unreadable; moved to corrupt/
LIMITED = "limited"  # not tried: held for its submitter's next sending window (sendlimits)
STATUSES = (QUEUED, SENT, DEFERRED, THROTTLED, BOUNCED, REJECTED, QUARANTINED, LIMITED)

# --- delivery status notifications (bounce.py) ---------------------------------------------
REPORT_FAILED = "failed"  # Action: failed; the entry goes to dead/
REPORT_DELAYED = "delayed"  # Action: delayed, with Will-Retry-Until

# --- the spool entry's envelope records, in their order (spoolfmt.py) -----------------------
REC_ID = b"id"
REC_ARRIVAL = b"arrival"
REC_UID = b"uid"
REC_SIZE = b"size"
REC_BODY = b"body"
REC_SENDER = b"sender"
REC_RCPT = b"rcpt"
ENVELOPE_RECORDS = (REC_ID, REC_ARRIVAL, REC_UID, REC_SIZE, REC_BODY, REC_SENDER, REC_RCPT)
# Format version 2, drop-folder entries only: "failed RCPT<TAB>REPLY" after the rcpt records.
REC_FAILED = b"failed"

# --- the state file's fields (spoolfmt.encode_state) ----------------------------------------
STATE_COUNTERS = (
    "attempts", "throttled", "first_attempt", "last_attempt", "next_attempt", "requeued",
)  # fmt: skip
STATE_FLAGS = ("held", "warned", "reported", "relay_wait")
STATE_REPLIES = ("done", "failed", "pending")  # recipient -> reply, stored as fields
REPLY_FIELDS = ("code", "enhanced", "text", "kind", "stage")

# --- the command a permanent refusal answered, when it concerns the message (reply.stage) ---
STAGE_MAIL = "mail"  # refused at MAIL FROM: the message or its sender, not a recipient
STAGE_SIZE = "size"  # refused at MAIL FROM, the declared SIZE over the listener's limit
REPLY_STAGES = (STAGE_MAIL, STAGE_SIZE)
