"""`python -m bench [--quick | --smoke] [--out DIR]`: run the benchmarks and write DIR/latest.{json,md} + plots."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from types import FrameType

from ._presets import FULL, QUICK, SMOKE
from ._procs import CHILDREN
from .report import SIDES  # noqa: F401  (imported early: matplotlib's Agg backend before anything else)
from .runner import run

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _terminate)
    try:
        results = asyncio.run(run(preset, args.out, progress_bar=not args.no_progress))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    finally:
        CHILDREN.kill_all()
    print((args.out / "latest.md").read_text())
    for target in results["targets"]:
        print(f"{'met   ' if target['met'] else 'MISSED'}  {target['name']}: {target['value']} ({target['target']})")
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
