"""`core/engine/_dispatcher.py`: the running total of free slots stays the sum over the open watchers, whatever happens.

`free_capacity()` is read once per poll, per reservation and per stats call, so the dispatcher keeps it as a
total updated by each change instead of walking every watcher (issue #13). A wrong update would make the poller
poll for slots nobody has (items left unacked) or stop polling while sandboxes wait. Hypothesis drives random
sequences of every change the sidecar makes and compares the total with the walk after each step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.engine._dispatcher import Dispatcher, Watcher
from sidecar.work.v1 import work_service_pb2 as pb

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "reserve", "unreserve", "assign", "release", "attach", "close", "drain"]),
        st.integers(min_value=0, max_value=7),
        st.integers(min_value=0, max_value=3),
    ),
    max_size=60,
)


def _walk(dispatcher: Dispatcher) -> int:
    return 0 if dispatcher.draining else sum(watcher.free for watcher in dispatcher.watchers)


def _step(dispatcher: Dispatcher, reserved: list[Watcher], action: str, pick: int, size: int, n: int) -> None:
    watchers = dispatcher.watchers
    if action == "add":
        dispatcher.add_watcher(f"sandbox-{n}", max_in_flight=size + 1, max_items=size)
    elif action == "reserve":
        watcher = dispatcher.reserve()
        if watcher is not None:
            reserved.append(watcher)
    elif action in ("unreserve", "assign") and reserved:
        watcher = reserved.pop(pick % len(reserved))
        if action == "unreserve":
            dispatcher.unreserve(watcher)
        else:
            dispatcher.assign(watcher, f"work_{n}", pb.WatchWorkResponse())
    elif action == "release" and watchers:
        watcher = watchers[pick % len(watchers)]
        if watcher.held:
            dispatcher.release(watcher, sorted(watcher.held)[0])
    elif action == "attach" and watchers:
        dispatcher.attach(watchers[pick % len(watchers)], f"work_resumed_{pick}")
    elif action == "close" and watchers:
        dispatcher.close_watcher(watchers[pick % len(watchers)])
    elif action == "drain" and pick == 7:  # rare: nothing is free once draining
        dispatcher.start_drain(pb.Draining())


@settings(max_examples=300, deadline=None)
@given(ACTIONS)
def test_free_capacity_is_always_the_sum_over_open_watchers(actions: list[tuple[str, int, int]]) -> None:
    dispatcher = Dispatcher()
    reserved: list[Watcher] = []
    for n, (action, pick, size) in enumerate(actions):
        _step(dispatcher, reserved, action, pick, size, n)
        assert dispatcher.free_capacity() == _walk(dispatcher), (n, action)
        if dispatcher.free_capacity() == 0:
            assert dispatcher.reserve() is None


def test_a_reservation_takes_one_slot_and_assignment_keeps_it() -> None:
    dispatcher = Dispatcher()
    watcher = dispatcher.add_watcher("sandbox", max_in_flight=2, max_items=3)
    assert dispatcher.free_capacity() == 2
    assert dispatcher.reserve() is watcher and dispatcher.free_capacity() == 1
    dispatcher.assign(watcher, "work_1", pb.WatchWorkResponse())
    assert dispatcher.free_capacity() == 1, "the slot is held now, not reserved"
    assert dispatcher.reserve() is watcher and dispatcher.free_capacity() == 0
    assert dispatcher.reserve() is None
    dispatcher.release(watcher, "work_1")
    assert dispatcher.free_capacity() == 1, "one held until now and released, one reserved: one more"
    dispatcher.close_watcher(watcher)
    assert dispatcher.free_capacity() == 0
