"""A Python sandbox on `sidecar.client`: take items one at a time, work on each, stop it, leave after ITEMS.

.venv/bin/python examples/python/client_sandbox.py unix:///tmp/work-sidecar.sock 1
"""

import asyncio
import sys

from sidecar.client import SidecarClient


async def main(address: str, items: int) -> None:
    async with SidecarClient(address, sandbox_id="sb-1") as sidecar:
        done = 0
        async for item in sidecar.assignments(max_in_flight=1, max_items=items):
            async with item:  # KeepAlive while inside; StopWork(force=true) on leaving
                print(f"working on {item.work_id} (session {item.work.data.id})")
                await asyncio.sleep(1)  # the work; item.credentials is the session's credential (a secret)
                # item.stop_requested set: finish up; item.lost set: stop at once, the item is not yours any more
            print(f"{item.work_id}: {'lost' if item.lost.is_set() else 'stopped'}")
            done += 1
            if done == items:
                break


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
