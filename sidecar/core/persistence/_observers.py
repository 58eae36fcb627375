"""The journal's two listeners: they turn what happens to leases and claims into records, and never change a lease.

- `LeaseRecorder`, a `LeaseObserver` (`sidecar.core.engine._lease`): every transition of a lease becomes its `L` record
  (or its `E` record when it ends). A fresh claim is written at once: its token is about to reach a sandbox.
- `ClaimRecorder`, the hand-over's `ClaimIntents` (`sidecar.core.engine._handover`): `A` before an ack leaves the
  process, `S` when a claim settled without a lease.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...workapi import HeartbeatResult
    from ..engine._lease import Lease
    from ._journal import Journal


class LeaseRecorder:
    __slots__ = ("_journal",)

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def claimed(self, lease: Lease) -> None:
        self._journal.record_lease(lease, at_once=not lease.adopted)

    def assigned(self, lease: Lease) -> None:
        self._journal.record_lease(lease)

    def renewed(self, lease: Lease, result: HeartbeatResult) -> None:
        self._journal.record_lease(lease)

    def stop_requested(self, lease: Lease) -> None:
        self._journal.record_lease(lease)

    def ended(self, lease: Lease) -> None:
        self._journal.record_end(lease)


class ClaimRecorder:
    __slots__ = ("_journal",)

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def acking(self, work_id: str) -> None:
        """The item is about to be acked: written before the ack leaves the process."""
        self._journal.record_acking(work_id)

    def settled(self, work_id: str) -> None:
        """The claim is over without a lease (the item is not ours, or it was released). A lease made by the
        claim settles it by itself."""
        self._journal.record_settled(work_id)
