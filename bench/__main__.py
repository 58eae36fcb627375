"""`python -m bench [--quick | --smoke] [--fleet] [--out DIR]`: run the benchmarks and write DIR/latest.{json,md} +
plots; with --fleet, the fleet simulation instead (K sidecars + the KEDA scaler: DIR/fleet.{json,md} + a plot).

Only a full run writes the committed results (`bench/results/`, and docs/benchmarks.md from them) unless --out says
otherwise: `--quick` writes to `bench/results/quick/` and `--smoke` to `bench/results/smoke/` (both git-ignored)."""

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
SCRATCH = {"quick": DEFAULT_OUT / "quick", "smoke": DEFAULT_OUT / "smoke"}
"""Where a run of a small preset goes without --out: never over the committed results."""


def output_dir(out: Path | None, *, quick: bool, smoke: bool) -> Path:
    """--out, else the committed results for a full run and a scratch directory for a small preset."""
    if out is not None:
        return out
    return SCRATCH["smoke"] if smoke else SCRATCH["quick"] if quick else DEFAULT_OUT


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help=f"small sizes, a few minutes (default --out {SCRATCH['quick']})"
    )
    size.add_argument(
        "--smoke", action="store_true", help=f"tiny sizes for the test suite (default --out {SCRATCH['smoke']})"
    )
    parser.add_argument("--out", type=Path, help=f"output directory (default for a full run: {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fleet", action="store_true", help="the fleet simulation (bench/fleet.py) instead")
    parser.add_argument("--ks", help="fleet sizes K, comma-separated (default: the preset's)")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, quick=args.quick, smoke=args.smoke)
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
    _sync_docs(args.out, preset is FULL)
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
    _sync_docs(args.out, preset is FLEET_FULL)
    print(f"written to {args.out}/")
    return 0


def _sync_docs(out: Path, full: bool) -> None:
    """A full run written to the committed results regenerates docs/benchmarks.md from them."""
    if full and out.resolve() == DEFAULT_OUT:
        from .docs import sync

        if sync():
            print("docs/benchmarks.md now shows this run")


if __name__ == "__main__":
    sys.exit(main())
