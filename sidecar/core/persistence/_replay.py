"""Reading a journal back: what a predecessor's journal says, from its bytes (no file I/O here).

The header binds the journal to an environment, API URL, provider and key; a journal without a readable header
(including one with no complete line at all: an empty file, a header torn mid-line, garbage with no newline)
cannot be attributed and is refused, as is one written for another binding. After the header the last record of
a work id wins. A torn last line (a crash mid-write) is counted; a line that does not check out is counted as
corrupt; a record that checks out but holds impossible values is counted as invalid; all are skipped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ._records import ID, Binding, JournaledEnd, JournaledLease, decode, parse_end, parse_lease

MAX_TOMBSTONES = 10_000
TOMBSTONE_MAX_AGE = 3600.0
"""Ended leases are remembered across restarts for this long (s), at most MAX_TOMBSTONES of them."""


@dataclass(slots=True)
class Recovered:
    """What the predecessor's journal says, as far as it could be read."""

    leases: list[JournaledLease] = field(default_factory=list)
    ended: list[JournaledEnd] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    """Items acked (or about to be) whose claim never settled."""
    torn: int = 0
    corrupt: int = 0
    invalid: int = 0
    """Records that check out but hold impossible values (a non-finite expiry, a negative TTL, a bad id): skipped."""
    refused: str | None = None
    """Why the journal was not adopted at all (it is moved aside), or None."""
    refused_as: str = ""
    """'corrupt' (it cannot be attributed), 'refused' (it belongs to another binding) or 'unreadable'."""
    clean: bool = False
    """The predecessor drained and closed the journal (nothing after): its releases were all sent."""
    moved_to: str | None = None
    version: int = 0
    """The format the journal was written in."""

    @property
    def damaged(self) -> bool:
        return bool(self.torn or self.corrupt or self.invalid)


def replay(data: bytes, binding: Binding, *, now: float) -> Recovered:
    """What `data` (a whole journal file) says; tombstones older than `TOMBSTONE_MAX_AGE` at `now` are dropped."""
    recovered = Recovered()
    lines = data.split(b"\n")
    if lines[-1]:
        recovered.torn = 1  # the last record was being written when the process died
    lines.pop()
    if not lines:  # not even a header: no sidecar writes that (a journal is always replaced whole, header first)
        return _refuse(recovered, "corrupt", "it has no complete line, so it cannot be attributed")
    header = decode(lines[0])
    if header is None or header.get("op") != "H":
        return _refuse(recovered, "corrupt", "its header is unreadable, so it cannot be attributed")
    mismatch = binding.mismatch(header)
    if mismatch is not None:
        return _refuse(recovered, "refused", f"it was written for another {mismatch}")
    recovered.version = version = int(header["format"])
    live, ended, acked = _last_records(lines[1:], recovered)
    for record in live.values():
        lease = parse_lease(record, version)
        if lease is None:
            recovered.invalid += 1
        else:
            recovered.leases.append(lease)
    for record in list(ended.values())[-MAX_TOMBSTONES:]:
        end = parse_end(record, version)
        if end is None:
            recovered.invalid += 1
        elif now - end.ended_at <= TOMBSTONE_MAX_AGE:
            recovered.ended.append(end)
    recovered.acked = list(acked)
    return recovered


def _refuse(recovered: Recovered, kind: str, why: str) -> Recovered:
    recovered.refused = why
    recovered.refused_as = kind
    return recovered


_Records = dict[str, dict[str, Any]]


def _last_records(lines: list[bytes], recovered: Recovered) -> tuple[_Records, _Records, dict[str, None]]:
    """The last record of every work id after the header: (held, ended in order of ending, acked unsettled)."""
    live: _Records = {}
    ended: _Records = OrderedDict()
    acked: dict[str, None] = {}
    for line in lines:
        record = decode(line)
        if record is None:
            recovered.corrupt += 1
            continue
        op, work_id = record["op"], record.get("work")
        if op == "C":
            recovered.clean = True
            continue
        recovered.clean = False
        if op not in ("L", "E", "A", "S") or not isinstance(work_id, str) or not ID.fullmatch(work_id):
            recovered.invalid += 1
            continue
        if op != "A":
            acked.pop(work_id, None)
        if op == "L":
            live[work_id] = record
            ended.pop(work_id, None)
        elif op == "E":
            live.pop(work_id, None)
            ended.pop(work_id, None)
            ended[work_id] = record
        elif op == "A":
            acked[work_id] = None
    return live, ended, acked
