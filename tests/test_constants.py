"""constants.py names the values other modules write; these tests keep the two in step."""

from __future__ import annotations

import ast
import inspect
import json

from mailshim import config, constants, policy, spoolfmt
from mailshim.reply import Reply
from mailshim.spoolfmt import Envelope, State


def test_the_module_imports_nothing():
    tree = ast.parse(inspect.getsource(constants))
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    assert imported == {"__future__"}


def test_delivery_modes_are_the_configs():
    assert sorted(constants.DELIVERY_MODES) == sorted(config.DELIVERY_MODES)


def test_envelope_records_are_written_in_the_named_order():
    env = Envelope("0" * 20, "a@example.org", ["b@example.org", "c@example.org"], 1, 0)
    head = spoolfmt.encode_envelope(env).data.split(b"\n\n", 1)[0]
    names = [line.split(b" ", 1)[0] for line in head.split(b"\n")[1:]]
    assert tuple(dict.fromkeys(names)) == constants.ENVELOPE_RECORDS
    env.failed = {"c@example.org": "550 5.1.1 no"}
    head = spoolfmt.encode_envelope(env).data.split(b"\n\n", 1)[0]
    names = [line.split(b" ", 1)[0] for line in head.split(b"\n")[1:]]
    assert tuple(dict.fromkeys(names)) == (*constants.ENVELOPE_RECORDS, constants.REC_FAILED)


def test_state_fields_are_the_named_ones():
    state = State()
    state.failed["a@example.org"] = Reply(0, "timed out", kind="timeout")
    data = json.loads(spoolfmt.encode_state(state))
    named = {*constants.STATE_COUNTERS, *constants.STATE_FLAGS, *constants.STATE_REPLIES}
    assert named <= set(data)
    assert set(data["failed"]["a@example.org"]) <= set(constants.REPLY_FIELDS)


def test_back_pressure_kinds():
    assert policy.pressure_kind(Reply(452, "4.4.5 slow down")) == "rate"
    assert policy.pressure_kind(Reply(452, "4.2.2 greylisted")) == "greylist"
    assert policy.pressure_kind(Reply(451, "4.3.0 later")) is None
    assert policy.pressure_kind(Reply(0, "4.4.5 is not a reply", kind="closed")) is None
