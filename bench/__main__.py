"""`python -m bench [--quick | --smoke] [--fleet] [--out DIR]`: run the benchmarks and write DIR/latest.{json,md} +
plots; with --fleet, the fleet simulation instead (K sidecars + the KEDA scaler: DIR/fleet.{json,md} + a plot)."""

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
    parser.add_argument("--fleet", action="store_true", help="the fleet simulation (bench/fleet.py) instead")
    parser.add_argument("--ks", help="fleet sizes K, comma-separated (default: the preset's)")
    args = parser.parse_args(argv)
    if args.fleet:
        return _fleet(args)
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
    if args.out.resolve() == DEFAULT_OUT and preset is FULL:
        from .readme import sync

        if sync():
            print("README.md: the benchmark section now shows this run")
    for target in results["targets"]:
        print(f"{'met   ' if target['met'] else 'MISSED'}  {target['name']}: {target['value']} ({target['target']})")
    print(f"written to {args.out}/")
    return 0


def _fleet(args: argparse.Namespace) -> int:
    import dataclasses

    from .fleet import FLEET_FULL, FLEET_SMOKE
    from .fleet import run as run_fleet

    preset = FLEET_SMOKE if args.smoke else FLEET_FULL
    if args.ks:
        preset = dataclasses.replace(preset, ks=tuple(int(k) for k in args.ks.split(",")))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        asyncio.run(run_fleet(preset, args.out))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    finally:
        CHILDREN.kill_all()
    print((args.out / "fleet.md").read_text())
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
