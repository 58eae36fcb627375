"""`python -m chaos [--quick] [--only NAME …] [--phase S] [--fuzz-examples N] [--out DIR]`: the chaos matrix.

Starts the emulator (its own process), the fault proxy (in this process) and, per scenario, a fresh
`work-sidecar serve` and sandbox processes; runs every scenario (≥ 10 minutes in all by default), then the gRPC
input fuzzing; prints and writes the table scenario → items, lost, duplicated, reworked, stranded, leaked to
DIR/latest.md and DIR/latest.json (a full run into `chaos/results/` also rewrites the table in `docs/chaos.md`).
Exit status 0 when every number is zero, 1 otherwise. `python -m chaos proxy --upstream URL [--port P]` runs the
fault proxy alone (rules: POST /_chaos/rules); `python -m chaos docs` rewrites the generated parts of
`docs/chaos.md` from `chaos/results/latest.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench._provenance import provenance

from . import docs
from .docs import COLUMNS
from .harness import Emulator, Processes
from .proxy import Proxy
from .scenarios import SCENARIOS, run_scenario

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def table(rows: list[dict[str, Any]]) -> str:
    head = "| scenario | " + " | ".join(COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for row in rows:
        lines.append(f"| {row['scenario']} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def document(meta: dict[str, Any], rows: list[dict[str, Any]], fuzz: dict[str, Any] | None) -> str:
    out = [
        f"# Chaos run `{meta['mode']}` on {meta['started']}",
        "",
        f"Commit `{meta.get('commit', 'unknown')}`{' (with uncommitted changes)' if meta.get('dirty') else ''}"
        + (
            f" (HEAD moved to `{meta['commit_at_end']}` during the run)"
            if meta.get("commit_at_end") not in (None, meta.get("commit"))
            else ""
        )
        + f", on {meta.get('cpu_model', 'unknown CPU')}.",
        "",
        f"{meta['minutes']:.1f} min, {meta['cpus']} CPUs, Python {meta['python']}, seed {meta['seed']}, "
        f"phase {meta['phase']} s per scenario. Columns: see `chaos/invariants.py` (lost = held past the API's "
        "lease, duplicated = held by two sandboxes at once, reworked = worked on twice one run after the other, "
        "stranded = not stopped after the settle phase or "
        "stopped by nobody, leaked = distinct secrets in any output, errors = crashes, dead tasks, unbounded RSS).",
        "",
        table(rows),
        "",
    ]
    if fuzz is not None:
        out += ["## gRPC input fuzzing", "", "| RPC | examples | failures |", "|---|---:|---:|"]
        out += [f"| {r['rpc']} | {r['examples']} | {len(r['failures'])} |" for r in fuzz["rpcs"]]
        out += ["", f"sidecar RSS {fuzz['rss_before_mb']:.0f} → {fuzz['rss_after_mb']:.0f} MB", ""]
        for r in fuzz["rpcs"]:
            out += [f"- {r['rpc']}: {f}" for f in r["failures"][:5]]
        out.append("")
    out += ["## Notes", ""]
    for row in rows:
        for note in row["notes"][:12]:
            out.append(f"- **{row['scenario']}**: {note}")
    return "\n".join(out) + "\n"


async def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    started_wall = datetime.now(UTC)
    source = provenance()  # the code under test: recorded when the run starts
    procs = Processes()
    chosen = [s for s in SCENARIOS if (not args.only or s.name in args.only) and (not s.full_only or not args.quick)]
    rows: list[dict[str, Any]] = []
    fuzz_result: dict[str, Any] | None = None
    try:
        emulator = await Emulator.start(procs)
        proxy = Proxy(emulator.url, seed=args.seed)
        async with proxy.serve() as _url:
            for index, scenario in enumerate(chosen, 1):
                print(
                    f"[{index}/{len(chosen)}] {scenario.name}: {scenario.what} "
                    f"({time.monotonic() - started:.0f} s elapsed)",
                    flush=True,
                )
                t0 = time.monotonic()
                verdict = await run_scenario(
                    scenario, emulator, proxy, procs, phase=args.phase, seed=args.seed + index, quick=args.quick
                )
                row = {
                    "scenario": scenario.name,
                    "what": scenario.what,
                    **verdict.to_json(),
                    "seconds": round(time.monotonic() - t0, 1),
                }
                rows.append(row)
                flag = "ok" if verdict.clean else "VIOLATED"
                print(
                    f"    {flag}: " + ", ".join(f"{c} {row[c]}" for c in COLUMNS) + f" ({row['seconds']} s)", flush=True
                )
                for note in verdict.notes[:3]:
                    print(f"      {note}", flush=True)
        if args.fuzz_examples:
            from .fuzz import fuzz_all

            print(f"[fuzz] every WorkService RPC, {args.fuzz_examples} examples each", flush=True)
            fuzz_result = await fuzz_all(procs, emulator, examples=args.fuzz_examples)
            bad = sum(len(r["failures"]) for r in fuzz_result["rpcs"])
            print(f"    {'ok' if not bad else 'VIOLATED'}: {bad} failing example(s)", flush=True)
        await emulator.close()
    finally:
        procs.kill_all()
    meta = {
        "mode": "quick" if args.quick else "full",
        "started": started_wall.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.monotonic() - started) / 60,
        "cpus": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "seed": args.seed,
        "phase": args.phase,
        **source,
        "commit_at_end": provenance()["commit"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps({**meta, "scenarios": rows, "fuzz": fuzz_result}, indent=2))
    markdown = document(meta, rows, fuzz_result)
    (args.out / "latest.md").write_text(markdown)
    print()
    print(table(rows))
    print(f"written to {args.out}/latest.md and latest.json (child logs in {procs.directory})")
    if args.out.resolve() == DEFAULT_OUT and meta["mode"] == "full" and not args.only and docs.update():
        print(f"and the table in {docs.PAGE}")
    violated = any(row[c] for row in rows for c in COLUMNS if c not in ("items", "completed"))
    fuzz_bad = fuzz_result is not None and any(r["failures"] for r in fuzz_result["rpcs"])
    return 1 if violated or fuzz_bad else 0


async def run_proxy(upstream: str, port: int) -> None:
    proxy = Proxy(upstream)
    async with proxy.serve(port=port) as url:
        print(f"fault proxy on {url} → {upstream} (rules: POST {url}/_chaos/rules)", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["docs"]:
        print(f"{docs.PAGE} {'rewritten' if docs.update() else 'up to date'}")
        return 0
    if argv[:1] == ["proxy"]:
        parser = argparse.ArgumentParser(prog="python -m chaos proxy")
        parser.add_argument("--upstream", required=True)
        parser.add_argument("--port", type=int, default=8788)
        ns = parser.parse_args(argv[1:])
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_proxy(ns.upstream, ns.port))
        return 0
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases, no scenario that needs > 30 s (~4 min)")
    parser.add_argument("--only", nargs="*", default=[], help="run only these scenarios")
    parser.add_argument("--phase", type=float, default=None, help="seconds of faults per scenario (30; quick: 6)")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--fuzz-examples", type=int, default=None, help="Hypothesis examples per RPC (200; quick 30)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.phase is None:
        args.phase = 6.0 if args.quick else 30.0
    if args.fuzz_examples is None:
        args.fuzz_examples = 30 if args.quick else 200
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
