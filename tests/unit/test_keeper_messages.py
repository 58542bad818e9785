"""The keeper's typed messages: every operation has one request type; frames that do not match it are
refused with a message naming the field, and replies carry the status flat."""

from __future__ import annotations

import pytest

from resurgo.checkpoint.keeper import messages as m


def test_every_operation_has_a_request_type_with_its_reply() -> None:
    assert set(m.REQUESTS) == set(m.Op)
    for op, cls in m.REQUESTS.items():
        assert cls.op is op and issubclass(cls.reply, m.Reply)


def test_a_request_round_trips_through_its_frame() -> None:
    request = m.Complete(rank=1, slot=0, step=7, tree={"train": {"step": 7}}, persist=True, checksums=[1, 2])
    frame = request.to_json()
    assert frame["op"] == "complete" and frame["rank"] == 1
    assert m.parse(frame) == request


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ({"op": "launch"}, "unknown request 'launch'"),
        ({"op": "read", "rank": 0}, "malformed 'read' request"),
        ({"op": "read", "rank": 0, "step": 1, "colour": "red"}, "unknown field(s) ['colour']"),
        ({"op": "acquire", "rank": "zero", "step": 1}, "field 'rank' must be int"),
        ({"op": "acquire", "rank": 0, "step": 1, "required": "yes"}, "field 'required' must be bool"),
        ({"op": "holdings", "rank": None}, "field 'rank' may not be null"),
    ],
)
def test_a_frame_that_is_no_request_is_refused_by_name(frame: dict, says: str) -> None:
    with pytest.raises(m.MalformedMessage, match=None) as caught:
        m.parse(frame)
    assert says in str(caught.value)


def test_a_reply_carries_its_status_flat_and_ignores_newer_fields() -> None:
    reply = m.AcquireReply(reason="busy", status=m.Status(copied=3, committed=2))
    frame = reply.to_json()
    assert frame["reason"] == "busy" and frame["copied"] == 3 and "status" not in frame
    back = m.AcquireReply.from_json({**frame, "added_later": 1})
    assert back == reply
    assert m.AcquireReply.from_json({"slot": 2}).status is None  # a granted slot carries no status
