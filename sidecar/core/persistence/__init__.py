"""Persistence (`--state-dir`): what a restarted sidecar needs to continue the leases a crashed one held.

- `_records`: the record format (checksummed JSON lines, the journal's own names for lease states and reasons,
  a format version; every format written so far is read);
- `_replay`: reading a journal back into what it says (`Recovered`), without touching a file;
- `_files`: the state dir, its lock and the file operations (atomic replace, fsync, moving a file aside);
- `_journal`: `Journal`, the file and its state in memory: batched writes, fsync, compaction, and no new work while
  it cannot be written;
- `_observers`: the journal's listeners, `LeaseRecorder` (a `LeaseObserver`) and `ClaimRecorder` (the hand-over's
  `ClaimIntents`).

The token key (`sidecar.core.persistence._tokens`) and adoption at start
(`sidecar.core.persistence._adoption`) build on it.
"""

from ._files import JOURNAL_FILE, LOCK_FILE, StateDirError, prepare_state_dir
from ._journal import Journal
from ._records import FORMAT, Binding, JournaledEnd, JournaledLease, decode
from ._replay import Recovered, replay

__all__ = [
    "FORMAT",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "Binding",
    "Journal",
    "JournaledEnd",
    "JournaledLease",
    "Recovered",
    "StateDirError",
    "decode",
    "prepare_state_dir",
    "replay",
]
