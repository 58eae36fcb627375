"""The lease journal (`sidecar.core.persistence`) and the token issuer on their own: what is written is what a
successor reads, through compaction, damage and a foreign header; tokens a successor recomputes."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from sidecar.core.engine._lease import Leases
from sidecar.core.persistence import (
    FORMAT,
    JOURNAL_FILE,
    Binding,
    Journal,
    JournaledLease,
    StateDirError,
    decode,
    replay,
)
from sidecar.core.persistence._records import FORMAT_1_REASONS, FORMAT_1_STATES, REASON_NAMES, STATE_NAMES
from sidecar.core.persistence._tokens import KEY_FILE, TokenIssuer
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import HeartbeatResult, Work, WorkData

BINDING = Binding.of(environment_id="env_a", api_url="http://127.0.0.1:1/", provider="anthropic", api_key="sk-1")


def _work(work_id: str) -> Work:
    return Work(id=work_id, environment_id="env_a", data=WorkData(type="session", id="s_" + work_id), state="active",
                metadata={}, secret=None)  # fmt: skip


def _beat(n: int) -> HeartbeatResult:
    return HeartbeatResult(last_heartbeat=f"2026-01-01T00:00:{n:02d}.000001Z", lease_extended=True, state="active",
                           ttl_seconds=60)  # fmt: skip


def _journaled(tmp_path: Path) -> tuple[Journal, Leases]:
    journal = Journal(tmp_path, BINDING)
    journal.open()
    leases = Leases([journal.observer], tokens=TokenIssuer.in_dir(tmp_path))
    return journal, leases


async def test_a_successor_reads_the_latest_state_of_every_lease(tmp_path: Path) -> None:
    journal, leases = _journaled(tmp_path)
    held = leases.claim(_work("w1"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    leases.renewed(held, _beat(2), sent_at=time.monotonic())
    leases.request_stop(held)
    gone = leases.claim(_work("w2"), _beat(3), sent_at=time.monotonic(), ttl_seconds=60)
    leases.lose(gone, pb.LEASE_LOST_REASON_SANDBOX_GONE, "gone")
    journal.intents.acking("w3")
    journal.intents.acking("w4")
    journal.intents.settled("w4")
    await asyncio.sleep(0)  # one loop iteration: the batched write
    journal.close()

    successor = Journal(tmp_path, BINDING)
    recovered = successor.open()
    [lease] = recovered.leases
    assert (lease.work_id, lease.last_heartbeat, lease.state) == ("w1", _beat(2).last_heartbeat, held.state)
    assert lease.stop_notified and lease.data_id == "s_w1"
    assert TokenIssuer.in_dir(tmp_path).token("w1", lease.nonce) == held.token, "the successor recomputes the token"
    [end] = recovered.ended
    assert (end.work_id, end.reason) == ("w2", pb.LEASE_LOST_REASON_SANDBOX_GONE)
    assert recovered.acked == ["w3"]
    assert (recovered.torn, recovered.corrupt, recovered.refused) == (0, 0, None)
    successor.close()


async def test_no_token_and_no_secret_on_disk_and_the_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal, leases = _journaled(state)
    lease = leases.claim(_work("w1"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    journal.close()
    data = (state / JOURNAL_FILE).read_bytes()
    assert lease.token.encode() not in data and lease.token.split(".")[1].encode() not in data
    assert b"secret" not in data and b"sk-1" not in data, "neither the item secret nor the API key"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in (JOURNAL_FILE, KEY_FILE):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600


async def test_compaction_keeps_the_state_and_what_was_written_meanwhile(tmp_path: Path) -> None:
    journal, leases = _journaled(tmp_path)
    held = [leases.claim(_work(f"w{i}"), _beat(0), sent_at=time.monotonic(), ttl_seconds=60) for i in range(50)]
    for n in range(1, 40):
        for lease in held:
            leases.renewed(lease, _beat(n), sent_at=time.monotonic())
        await asyncio.sleep(0)
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    compaction = asyncio.ensure_future(journal.compact())
    await asyncio.sleep(0)  # the compaction is (or was) writing the new file: transitions keep coming
    for lease in held[:10]:
        leases.renewed(lease, _beat(59), sent_at=time.monotonic())
    leases.end(held[10], pb.LEASE_STATE_STOPPED)
    await compaction
    await asyncio.sleep(0)
    journal.close()
    assert (tmp_path / JOURNAL_FILE).stat().st_size < size / 10
    recovered = Journal(tmp_path, BINDING).open()
    beats = {lease.work_id: lease.last_heartbeat for lease in recovered.leases}
    assert len(beats) == 49 and "w10" not in beats
    assert {beats[f"w{i}"] for i in range(10)} == {_beat(59).last_heartbeat}
    assert {beats[f"w{i}"] for i in range(11, 50)} == {_beat(39).last_heartbeat}


def test_damage_is_reported_and_the_rest_adopted(tmp_path: Path) -> None:
    journal, leases = _journaled(tmp_path)
    for i in range(3):
        leases.claim(_work(f"w{i}"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    journal.close()
    path = tmp_path / JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"w1"', b'"w9"')  # the checksum no longer matches
    path.write_bytes(b"\n".join(lines) + b"1234")
    recovered = Journal(tmp_path, BINDING).open()
    assert sorted(lease.work_id for lease in recovered.leases) == ["w0", "w2"]
    assert (recovered.torn, recovered.corrupt) == (1, 1)


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (Binding.of(environment_id="env_b", api_url="http://127.0.0.1:1", provider="anthropic", api_key="sk-1"),
         "environment"),
        (Binding.of(environment_id="env_a", api_url="http://127.0.0.1:2", provider="anthropic", api_key="sk-1"),
         "API URL"),
        (Binding.of(environment_id="env_a", api_url="http://127.0.0.1:1", provider="anthropic", api_key="sk-2"),
         "API key"),
    ],
)  # fmt: skip
def test_a_journal_for_another_binding_is_moved_aside(tmp_path: Path, other: Binding, named: str) -> None:
    journal, leases = _journaled(tmp_path)
    leases.claim(_work("w1"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    journal.close()
    successor = Journal(tmp_path, other)
    recovered = successor.open()
    assert recovered.leases == [] and recovered.refused == f"it was written for another {named}"
    assert recovered.moved_to is not None and Path(recovered.moved_to).exists()
    successor.close()
    header = decode((tmp_path / JOURNAL_FILE).read_bytes().split(b"\n")[0])
    assert header is not None and header["environment_id"] == other.environment_id


def test_an_unreadable_header_is_not_adopted(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b"garbage\n" + b"more garbage\n")
    recovered = Journal(tmp_path, BINDING).open()
    assert recovered.refused is not None and "header" in recovered.refused and recovered.leases == []


def test_one_sidecar_per_state_dir(tmp_path: Path) -> None:
    first = Journal(tmp_path, BINDING)
    first.open()
    with pytest.raises(StateDirError, match="another work-sidecar process"):
        Journal(tmp_path, BINDING).open()
    first.close()
    Journal(tmp_path, BINDING).open()  # free again once the first is closed (or dead)


def test_tokens_verify_only_with_the_same_key_and_nonce(tmp_path: Path) -> None:
    issuer = TokenIssuer.in_dir(tmp_path)
    token, nonce = issuer.issue("w1")
    assert TokenIssuer.in_dir(tmp_path).token("w1", nonce) == token
    assert issuer.token("w2", nonce) != token, "bound to the work id"
    assert TokenIssuer.ephemeral().token("w1", nonce) != token, "bound to the key"
    assert "key" not in repr(issuer).replace("<key redacted>", "")
    (tmp_path / KEY_FILE).write_bytes(b"short")
    assert TokenIssuer.in_dir(tmp_path).token("w1", nonce) != token, "a damaged key is replaced, not fatal"
    assert any(name.startswith(KEY_FILE + ".corrupt-") for name in os.listdir(tmp_path))


def test_a_clean_close_tells_the_successor_its_releases_were_sent(tmp_path: Path) -> None:
    journal, leases = _journaled(tmp_path)
    lease = leases.claim(_work("w1"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    leases.lose(lease, pb.LEASE_LOST_REASON_DRAINED, "drained")
    journal.close(clean=True)
    successor = Journal(tmp_path, BINDING)
    recovered = successor.open()
    assert recovered.clean and [end.work_id for end in recovered.ended] == ["w1"]
    successor.close()  # not clean: a crash after this start
    assert not Journal(tmp_path, BINDING).open().clean


# -- the record format ---------------------------------------------------------------------------------------------

FORMAT_1 = Path(__file__).parent / "data" / "leases-format-1.journal"
"""A journal written by the sidecar at 467db17 (format 1: states and reasons as protobuf enum numbers): a lease
renewed and assigned, one stop-requested, three ended (sandbox gone, stopped, precondition failed), an ack
unsettled, an ack settled, and a lease claimed last."""
FORMAT_1_BINDING = Binding.of(
    environment_id="env_fixture", api_url="http://127.0.0.1:8787/", provider="anthropic", api_key="sk-fixture"
)
FORMAT_1_WRITTEN_AT = 1796610847.369


def test_a_journal_written_in_format_1_is_read() -> None:
    recovered = replay(FORMAT_1.read_bytes(), FORMAT_1_BINDING, now=FORMAT_1_WRITTEN_AT)
    assert (recovered.version, recovered.refused, recovered.damaged) == (1, None, False)
    leases = {lease.work_id: lease for lease in recovered.leases}
    assert sorted(leases) == ["work_01", "work_02", "work_08"]
    assert leases["work_01"] == JournaledLease(
        work_id="work_01", data_type="session", data_id="sesn_01", last_heartbeat="2026-12-07T02:40:02.000001Z",
        ttl_seconds=60, expires_at=1796610907.363, nonce="3epHG9vDNwsoy_1x", sandbox_id="sandbox-a",
        state=pb.LEASE_STATE_ACTIVE, stop_notified=False,
    )  # fmt: skip
    stopping = leases["work_02"]
    assert (stopping.state, stopping.stop_notified, stopping.data_type) == (
        pb.LEASE_STATE_STOP_REQUESTED, True, "healthcheck",
    )  # fmt: skip
    assert {end.work_id: (end.state, end.reason) for end in recovered.ended} == {
        "work_03": (pb.LEASE_STATE_LOST, pb.LEASE_LOST_REASON_SANDBOX_GONE),
        "work_04": (pb.LEASE_STATE_STOPPED, pb.LEASE_LOST_REASON_UNSPECIFIED),
        "work_05": (pb.LEASE_STATE_LOST, pb.LEASE_LOST_REASON_PRECONDITION_FAILED),
    }
    assert recovered.acked == ["work_06"], "work_07's claim settled"


def test_a_format_1_journal_is_adopted_and_written_afresh_in_the_current_format(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(FORMAT_1.read_bytes())
    journal = Journal(tmp_path, FORMAT_1_BINDING)
    first = journal.open()
    journal.close()
    data = (tmp_path / JOURNAL_FILE).read_bytes()
    header = decode(data.split(b"\n")[0])
    assert header is not None and header["format"] == FORMAT == 2
    assert b'"state":"stop_requested"' in data and b'"state":2' not in data, "states by name, not enum numbers"
    again = Journal(tmp_path, FORMAT_1_BINDING).open()
    assert again.version == FORMAT and again.leases == first.leases and again.acked == first.acked


def test_every_lease_state_and_reason_has_a_name_on_disk() -> None:
    assert set(REASON_NAMES) == set(pb.LeaseLostReason.values())
    assert set(STATE_NAMES) == set(pb.LeaseState.values()) - {pb.LEASE_STATE_UNSPECIFIED}
    assert len(set(REASON_NAMES.values())) == len(REASON_NAMES) and len(set(STATE_NAMES.values())) == len(STATE_NAMES)
    assert {FORMAT_1_REASONS[number] for number in FORMAT_1_REASONS} == set(REASON_NAMES.values())
    assert set(FORMAT_1_STATES.values()) == set(STATE_NAMES.values())


def test_temporary_files_left_by_a_killed_process_are_removed_under_the_lock(tmp_path: Path) -> None:
    leftovers = [".token.key.4242.tmp", f".{JOURNAL_FILE}.new", f".{JOURNAL_FILE}.compact"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"partial")
    journal = Journal(tmp_path, BINDING)
    journal.lock()
    assert not any((tmp_path / name).exists() for name in leftovers)
    journal.close()


async def test_a_journal_that_cannot_be_written_takes_no_work_and_recovers_everything(tmp_path: Path) -> None:
    """Finding 6.
    While writes fail (here every write of the journal's descriptor goes to /dev/full: ENOSPC) the journal says
    it does not accept, appends nothing more, keeps the state in memory, and a rewrite brings it all back."""
    journal, leases = _journaled(tmp_path)
    held = leases.claim(_work("w1"), _beat(1), sent_at=time.monotonic(), ttl_seconds=60)
    assert journal.accepting
    good, journal._fd = journal._fd, os.open("/dev/full", os.O_WRONLY)
    try:
        leases.renewed(held, _beat(2), sent_at=time.monotonic())
        await asyncio.sleep(0)
        assert not journal.accepting
        waiting = asyncio.ensure_future(journal.wait_accepting())
        fresh = leases.claim(_work("w2"), _beat(3), sent_at=time.monotonic(), ttl_seconds=60)
        leases.renewed(fresh, _beat(4), sent_at=time.monotonic())
        journal.intents.acking("w3")
        await asyncio.sleep(0)
        assert not waiting.done()
        await journal.compact()  # what `run` does every second while failing: the whole state, written afresh
        assert journal.accepting
        await asyncio.wait_for(waiting, 5)
    finally:
        assert good is not None
        os.close(good)
    journal.close()
    recovered = Journal(tmp_path, BINDING).open()
    assert {lease.work_id: lease.last_heartbeat for lease in recovered.leases} == {
        "w1": _beat(2).last_heartbeat,
        "w2": _beat(4).last_heartbeat,
    }
    assert recovered.acked == ["w3"] and not recovered.damaged
