"""The invariants checked after every scenario, from the emulator's request log and item views, the sandboxes'
event lines and every process's output. Nothing here trusts the sidecar's own account.

- **duplicated**: items held by two sandboxes at once (a sandbox holds an item from `assigned` until it hears
  `lost`, its work is done (`stopping`, written before it calls `StopWork`), or it is killed).
- **lost**: holds the Work API no longer backed: some moment while a sandbox held the item, no successful heartbeat
  (its granted TTL, from the request log) covered it, i.e. LeaseLost did not reach the sandbox before the API's
  lease expiry. After a lease theft the sandbox may hold on until the next heartbeat tells it (`theft_grace`).
- **reworked**: items worked on twice, one run after the other: a sandbox was given the item again after an
  earlier run of it ended, though that run ended for no reason that allows a redelivery. The reasons that do: the
  earlier sandbox was killed before the item came back (its work died with it), the item's lease was taken by
  someone else (lease theft), the fault proxy itself refused a renewal (a 404, 409 or 412 the Work API never sent,
  which the sidecar may believe), or the sidecar fenced by its clock (LeaseLost came once a whole fenced window,
  TTL minus `sidecar._fencing.fence_margin`, had passed since the start of the last claim or renewal call whose
  answer reached it intact, as the fault proxy saw it). A run that finished its work (`stopping`) and is then given
  again counts too: its stop was lost. This is what an answer lost after the Work API applied it costs when the
  sidecar believes the next refusal: nobody holds the item at once twice, but it runs twice.
- **stranded**: items not `stopped` after the settle phase (left `starting`, or never handed out again, or held
  forever), and items stopped though no sandbox ever held them.
- **leaked**: distinct secrets (the API key, item secrets and their session tokens, lease tokens) found in any
  output: the sidecar's stdout/stderr (DEBUG, JSON), the sandboxes' output.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar._fencing import fence_margin

from .harness import epoch

TOLERANCE = 0.05  # seconds: arrival-time vs processing-time jitter inside the emulator
FENCE_SLACK = 0.3  # seconds: a renewal reaches the proxy a moment after the sidecar sent it (its clock starts then)


@dataclass
class Hold:
    work_id: str
    sandbox: str
    start: float
    end: float
    end_kind: str
    killed_at: float | None = None
    """When the holding sandbox was killed (None: it was not)."""


@dataclass
class Verdict:
    items: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    reworked: int = 0
    stranded: int = 0
    leaked: int = 0
    errors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.reworked or self.stranded or self.leaked or self.errors)

    def to_json(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "completed": self.completed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reworked": self.reworked,
            "stranded": self.stranded,
            "leaked": self.leaked,
            "errors": self.errors,
            "notes": self.notes,
        }


def holds(sandboxes: Iterable[tuple[str, list[dict[str, Any]], float | None]], now: float) -> list[Hold]:
    """Every hold from each sandbox's (id, events, killed_at)."""
    out: list[Hold] = []
    for sandbox, events, killed_at in sandboxes:
        open_: dict[str, float] = {}
        for event in events:
            ev, work_id, at = event["ev"], event.get("work_id"), float(event["t"])
            if ev == "assigned" and work_id:
                if work_id in open_:  # assigned twice to the same sandbox while held: a duplicate too
                    out.append(Hold(work_id, sandbox, open_[work_id], at, "reassigned", killed_at))
                open_[work_id] = at
            elif ev in ("lost", "stopping", "stopped", "stop_error") and work_id in open_:
                out.append(Hold(work_id, sandbox, open_.pop(work_id), at, ev, killed_at))
        end = killed_at if killed_at is not None else now
        out.extend(
            Hold(w, sandbox, start, max(start, end), "killed" if killed_at else "open", killed_at)
            for w, start in open_.items()
        )
    return out


def lease_segments(
    log: list[dict[str, Any]], min_ttl: int, max_ttl: int, default_ttl: int
) -> dict[str, list[tuple[float, float]]]:
    """Per item, the [start, end] the Work API's lease was valid after each successful heartbeat."""
    out: dict[str, list[tuple[float, float]]] = {}
    for entry in log:
        if entry.get("operation") != "heartbeat" or entry.get("status") != 200 or not entry.get("work_id"):
            continue
        query = entry.get("query") or {}
        try:
            desired = int(query.get("desired_ttl_seconds", default_ttl))
        except ValueError:
            continue
        ttl = max(min_ttl, min(max_ttl, desired))
        at = epoch(entry["at"])
        out.setdefault(entry["work_id"], []).append((at, at + ttl))
    return out


def uncovered(start: float, end: float, segments: list[tuple[float, float]]) -> float:
    """Seconds of [start, end] not covered by any segment."""
    cursor, gap = start, 0.0
    for seg_start, seg_end in sorted(segments):
        if seg_end <= cursor:
            continue
        if seg_start > cursor:
            gap += min(seg_start, end) - cursor
        cursor = max(cursor, seg_end)
        if cursor >= end:
            break
    if cursor < end:
        gap += end - cursor
    return max(gap, 0.0)


def secrets_found(outputs: Iterable[str], secrets: Iterable[str]) -> set[str]:
    """The secrets that appear in any output, raw or JSON-escaped (≥ 8 characters, to avoid noise)."""
    texts = list(outputs)
    found: set[str] = set()
    for secret in secrets:
        if len(secret) < 8:
            continue
        forms = {secret, json.dumps(secret)[1:-1], secret.rstrip("=")}
        if any(form in text for text in texts for form in forms):
            found.add(secret)
    return found


def _count_duplicates(by_item: dict[str, list[Hold]], verdict: Verdict) -> None:
    """Items two sandboxes held at the same time."""
    for work_id, item_holds in by_item.items():
        ordered = sorted(item_holds, key=lambda h: h.start)
        longest = ordered[0]  # of the holds so far, the one that ends last
        for second in ordered[1:]:
            if second.start < longest.end - TOLERANCE:
                verdict.duplicated += 1
                verdict.notes.append(
                    f"duplicated {work_id}: {longest.sandbox} held it (until {longest.end_kind}) "
                    f"while {second.sandbox} got it"
                )
                break
            longest = max(longest, second, key=lambda h: h.end)


def renewal_deadline(ttl: float) -> float:
    """The longest a renewal attempt waits for its answer (`LeasePolicy.heartbeat_interval` with the defaults)."""
    return min(max(1.0, min(ttl / 2, 30.0)), 0.5 * (ttl - fence_margin(ttl)))


@dataclass
class Witness:
    """What the fault proxy saw of an item's claims and renewals (epoch times of their arrival)."""

    intact: dict[str, list[float]] = field(default_factory=dict)
    """Answered 200 and passed on intact within the renewal deadline: the successes the sidecar heard (each when
    the call it ended began)."""
    refused: dict[str, list[float]] = field(default_factory=dict)
    """Refused (404, 409, 412) by the proxy itself: refusals the sidecar may believe."""


def _excused(earlier: Hold, later: Hold, stolen: dict[str, float], seen: Witness, ttl: float) -> str | None:
    """Why `earlier`'s end allows the item to be worked on again (None: nothing does)."""
    if earlier.killed_at is not None and earlier.killed_at <= later.start + TOLERANCE:
        return "killed"
    stolen_at = stolen.get(earlier.work_id)
    if stolen_at is not None and stolen_at <= later.start:
        return "stolen"
    if earlier.end_kind == "lost" and any(
        earlier.start - TOLERANCE <= t <= earlier.end for t in seen.refused.get(earlier.work_id, [])
    ):
        return "refused"
    intact = seen.intact
    if earlier.end_kind == "lost":
        last = max((t for t in intact.get(earlier.work_id, []) if t <= earlier.end), default=None)
        if last is None or earlier.end >= last + ttl - fence_margin(ttl) - FENCE_SLACK:
            return "fenced"
    return None


def _count_reworked(
    by_item: dict[str, list[Hold]], stolen: dict[str, float], seen: Witness, ttl: float, verdict: Verdict
) -> None:
    """Items given to a sandbox again after a run of theirs ended for no reason that allows it."""
    for work_id, item_holds in by_item.items():
        ordered = sorted(item_holds, key=lambda h: h.start)
        for earlier, later in itertools.pairwise(ordered):
            if later.start < earlier.end - TOLERANCE:
                continue  # held at once: counted as duplicated
            if _excused(earlier, later, stolen, seen, ttl) is None:
                verdict.reworked += 1
                last = max((t for t in seen.intact.get(work_id, []) if t <= earlier.end), default=None)
                heard = "" if last is None else f", {earlier.end - last:.1f}s after the last renewal it heard"
                verdict.notes.append(
                    f"reworked {work_id}: {earlier.sandbox}'s run ended ({earlier.end_kind}{heard}) "
                    f"{later.start - earlier.end:.1f}s before {later.sandbox} was given it again"
                )
                break


def _count_lost(
    all_holds: list[Hold],
    segments: dict[str, list[tuple[float, float]]],
    stolen: dict[str, float],
    theft_grace: float,
    verdict: Verdict,
) -> None:
    """Holds that went on past the Work API's lease (LeaseLost came too late)."""
    for hold in all_holds:
        if hold.end - hold.start < TOLERANCE:
            continue
        item_segments = list(segments.get(hold.work_id, []))
        end = hold.end
        stolen_at = stolen.get(hold.work_id)
        if stolen_at is not None and hold.start <= stolen_at <= hold.end:
            # the thief holds it from `stolen_at`; ours only until the next heartbeat can tell the sandbox
            item_segments = [(s, min(e, stolen_at)) for s, e in item_segments if s <= stolen_at]
            item_segments.append((stolen_at, stolen_at + theft_grace))
        gap = uncovered(hold.start, end, item_segments)
        if gap > TOLERANCE:
            verdict.lost += 1
            verdict.notes.append(
                f"lost {hold.work_id}: {hold.sandbox} held it {gap:.2f}s past the API's lease (ended: {hold.end_kind})"
            )


def check(
    *,
    item_ids: list[str],
    items: list[dict[str, Any]],
    log: list[dict[str, Any]],
    sandboxes: list[tuple[str, list[dict[str, Any]], float | None]],
    outputs: list[str],
    secrets: set[str],
    ttl_bounds: tuple[int, int, int],
    stolen: dict[str, float] | None = None,
    theft_grace: float = 6.0,
    excluded: set[str] | None = None,
    seen: Witness | None = None,
    ttl: float = 4.0,
) -> Verdict:
    """`seen`: the fault proxy's account of the claims and renewals (`chaos.proxy.Proxy.intact_renewals`,
    `invented_refusals`); `ttl`: the sidecar's `--ttl`."""
    verdict = Verdict(items=len(item_ids))
    wanted = set(item_ids) - (excluded or set())
    all_holds = [h for h in holds(sandboxes, time.time()) if h.work_id in wanted]
    by_item: dict[str, list[Hold]] = {}
    for hold in all_holds:
        by_item.setdefault(hold.work_id, []).append(hold)

    _count_duplicates(by_item, verdict)
    _count_reworked(by_item, stolen or {}, seen or Witness(), ttl, verdict)
    _count_lost(all_holds, lease_segments(log, *ttl_bounds), stolen or {}, theft_grace, verdict)

    held = {h.work_id for h in all_holds}
    views = {item["id"]: item for item in items}
    for work_id in sorted(wanted):
        view = views.get(work_id)
        state = view.get("state") if view else "missing"
        if state == "stopped":
            verdict.completed += 1
            if work_id not in held:
                verdict.stranded += 1
                verdict.notes.append(f"stranded {work_id}: stopped though no sandbox held it")
        else:
            verdict.stranded += 1
            verdict.notes.append(f"stranded {work_id}: {state} after the settle phase")

    leaked = secrets_found(outputs, secrets)
    verdict.leaked = len(leaked)
    if leaked:
        verdict.notes.append(f"leaked {len(leaked)} secret(s) (e.g. one of {len(min(leaked, key=len))} characters)")
    return verdict
