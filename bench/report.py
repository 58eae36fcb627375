"""Targets (met / missed), and the results as JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SIDES = (("sidecar", "work-sidecar"), ("sdk", "official SDK worker"))
COLORS = {"sidecar": "#2b6cb0", "sdk": "#dd6b20"}
DPI = 100


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


# -- targets --------------------------------------------------------------------------------------------


def _spread(run: dict[str, Any], key: str, digits: int, template: str) -> str:
    """Every repeated run's value of `key`, in run order (empty for a single run)."""
    values = [r.get(key) for r in run.get("runs", ())]
    if len(values) < 2:
        return ""
    return template.format(" / ".join(_fmt(v, digits) for v in values))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #13's targets (and the idle ones kept from before), each met or missed in this run."""
    figures = results["figures"]
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: str, met: bool | None) -> None:
        out.append({"name": name, "target": target, "value": value, "met": met})

    throughput = figures["throughput"]
    key = "10" if "10" in throughput["sidecar"] else max(throughput["sidecar"], key=int)
    ours, theirs = throughput["sidecar"][key]["items_per_second"], throughput["sdk"][key]["items_per_second"]
    add(
        f"full-lifecycle throughput, sidecar with {key} sandboxes vs {key} SDK worker processes",
        "≥ 2.5 x",
        f"{ours:.0f} vs {theirs:.0f} items/s = {ours / theirs:.2f} x"
        + _spread(throughput["sidecar"][key], "items_per_second", 0, " (sidecar's runs: {})")
        + _spread(throughput["sdk"][key], "items_per_second", 0, " (SDK's runs: {})"),
        ours >= 2.5 * theirs,
    )
    dispatch, floor = figures["dispatch_latency"]["sidecar"], figures["dispatch_latency"]["floor"]
    parts, met = [], True
    for n, run in dispatch.items():
        base = floor.get(n, {}).get("p50_ms")
        if run["p50_ms"] is None or base is None:
            met = False
            continue
        parts.append(f"N={n}: {run['p50_ms']:.1f} vs {base:.1f}")
        met = met and run["p50_ms"] <= base + 2
    add("dispatch p50, sidecar vs the minimal client (ms)", "≤ floor + 2 ms at every N", " / ".join(parts), met)
    cpu = [(f"throughput N={key}", throughput["sidecar"][key].get("sidecar_cpu_ms_per_request"))]
    holds = figures["leases_held"]
    biggest = holds[max(holds, key=int)]
    cpu.append((f"{biggest['leases']:,} leases", biggest.get("sidecar_cpu_ms_per_request")))
    add(
        "sidecar CPU per Work API request",
        "≤ 0.5 ms",
        ", ".join(f"{label}: {_fmt(value, 2)} ms" for label, value in cpu)
        + _spread(throughput["sidecar"][key], "sidecar_cpu_ms_per_request", 2, f" (throughput N={key}'s runs: {{}})"),
        all(value is not None and value <= 0.5 for _, value in cpu),
    )
    add(
        f"{biggest['leases']:,} concurrent leases at TTL {biggest['ttl_seconds']}",
        "0 lost, ≤ 0.3 core, ≤ 8 KB RSS per lease",
        f"{biggest['lost']} lost, {biggest['sidecar_cores']:.2f} core, {biggest['rss_per_lease_kb']:.1f} KB/lease",
        biggest["lost"] == 0 and biggest["sidecar_cores"] <= 0.3 and biggest["rss_per_lease_kb"] <= 8,
    )
    burst = figures.get("burst") or {}
    if burst:
        ours_ms, theirs_ms = burst["sidecar"]["all_ms"], burst["sdk"]["all_ms"]
        add(
            f"burst of {burst['sidecar']['items']} items at N={burst['sidecar']['items']}: all dispatched",
            "no later than by as many SDK workers",
            f"{_fmt(ours_ms)} ms vs {_fmt(theirs_ms)} ms",
            ours_ms is not None and (theirs_ms is None or ours_ms <= theirs_ms),
        )
    idle = figures["idle_requests_per_minute"]["sidecar"]
    rates = [run["per_minute"] for run in idle.values()]
    add(
        "idle Work API requests/min, sidecar",
        "≤ ~61/min per environment, independent of N (spread ≤ 10 %)",
        " / ".join(f"N={n}: {run['per_minute']:.1f}" for n, run in idle.items()),
        bool(rates) and max(rates) <= 61.5 and (max(rates) - min(rates)) <= 0.1 * max(rates),
    )
    rss = figures["sidecar_rss_idle"]["rss_mb"]
    add("sidecar RSS idle", "≤ 60 MB", f"{rss:.1f} MB", rss <= 60)
    return out


# -- Markdown -------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    f = results["figures"]
    meta = results["meta"]
    ns = [str(n) for n in meta["ns"]]
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    lines = [
        f"Run `{meta['preset']}` on {meta['started']} of commit `{meta.get('commit', '?')}`"
        f"{' (with uncommitted changes)' if meta.get('dirty') else ''}, {meta['duration_seconds'] / 60:.1f} min, on "
        f"{meta['cpus']} CPUs ({meta.get('cpu_model', '?')}, {meta['machine']}), Python {meta['python']}, "
        f"anthropic {meta['anthropic']}. Load average (1/5/15 min) at the start "
        f"{' / '.join(_fmt(x, 2) for x in load[0] or [])}, at the end {' / '.join(_fmt(x, 2) for x in load[1] or [])}"
        " (a shared machine: other load slows both sides). "
        "N = sandboxes on one sidecar (work-sidecar) or SDK workers, one per sandbox (official SDK worker).",
        "",
        "| figure | N | work-sidecar | official SDK worker |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, values: dict[str, str]) -> None:
        for n in ns:
            lines.append(f"| {label} | {n} | {values.get('sidecar:' + n, '-')} | {values.get('sdk:' + n, '-')} |")

    def collect(figure: dict[str, Any], render: Any) -> dict[str, str]:
        return {f"{side}:{n}": render(run) for side, _ in SIDES for n, run in figure.get(side, {}).items()}

    row("idle Work API requests / min", collect(f["idle_requests_per_minute"], lambda r: _fmt(r["per_minute"])))
    row(
        "requests per item, short items (poll+ack+hb+stop)",
        collect(f["requests_per_item"]["short"], lambda r: _per_item(r)),
    )
    row("throughput, full lifecycle (items/s)", collect(f["throughput"], _throughput))
    row(
        "CPU per Work API request at saturation (ms)",
        collect(f["throughput"], lambda r: _fmt(r.get("sidecar_cpu_ms_per_request"), 2)),
    )
    long = f["requests_per_item"]["long"]
    first = next(iter(long.values()))
    lines.append(
        f"| requests per item, {_duration(first['hold_seconds'])} items at TTL {first['ttl_seconds']} "
        f"| {first['items']} | {_per_item(long.get('sidecar'))} | {_per_item(long.get('sdk'))} |"
    )
    lines += [
        "",
        "| leases held by one sidecar | lost | heartbeat lateness p50 / p99 / max (ms) | sidecar CPU (cores) "
        "| CPU per heartbeat (ms) | RSS idle → held (MB) | RSS per lease (KB) | fill (items/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in f["leases_held"].values():
        lines.append(
            f"| {run['leases']:,} x TTL {run['ttl_seconds']} s for {run['window_seconds']:g} s | {run['lost']} "
            f"| {_fmt(run['lateness_p50_ms'])} / {_fmt(run['lateness_p99_ms'])} / {_fmt(run['lateness_max_ms'])} "
            f"| {run['sidecar_cores']:.2f} | {_fmt(run.get('sidecar_cpu_ms_per_request'), 2)} "
            f"| {run['idle_rss_mb']:.1f} → {run['rss_mb']:.1f} "
            f"| {run['rss_per_lease_kb']:.1f} | {run['fill_items_per_second']:.0f} |"
        )
    lines += _dispatch_tables(f["dispatch_latency"], ns)
    burst = f.get("burst") or {}
    if burst:
        lines += [
            "",
            f"Burst of {burst['sidecar']['items']} items at once to {burst['sidecar']['items']} idle sandboxes: "
            f"all dispatched after **{_fmt(burst['sidecar']['all_ms'])} ms** (median {_fmt(burst['sidecar']['p50_ms'])}"
            f" ms) by one sidecar, after **{_fmt(burst['sdk']['all_ms'])} ms** (median {_fmt(burst['sdk']['p50_ms'])}"
            f" ms) by {burst['sdk']['items']} SDK workers.",
        ]
    emu = f["emulator_heartbeat_capacity"]
    lines += [
        "",
        f"Sidecar RSS idle: **{f['sidecar_rss_idle']['rss_mb']:.1f} MB**. "
        f"Emulator heartbeat capacity: **{emu['heartbeats_per_second']:,.0f} heartbeats/s** "
        f"({emu['connections']} connections, {emu['leases']} leases, emulator at {emu['emulator_cores']:.2f} core).",
        "",
        "| target (work-sidecar) | measured | |",
        "|---|---|---|",
    ]
    for target in results["targets"]:
        verdict = "met" if target["met"] else "**missed**"
        lines.append(f"| {target['name']}: {target['target']} | {target['value']} | {verdict} |")
    lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def _dispatch_tables(dispatch: dict[str, Any], ns: list[str]) -> list[str]:
    """Dispatch latency against the floor and the SDK, and its steps (empty without a floor run)."""
    lines: list[str] = []
    floor = dispatch.get("floor", {})
    if floor:
        lines += [
            "",
            "| dispatch p50 / p99 / max (ms) | N | work-sidecar | minimal client (the floor) | official SDK worker |",
        ]
        lines.append("|---|---:|---:|---:|---:|")

        def three(run: dict[str, Any] | None) -> str:
            return "-" if not run else f"{_fmt(run['p50_ms'])} / {_fmt(run['p99_ms'])} / {_fmt(run['max_ms'])}"

        for n in ns:
            sdk = dispatch["sdk"].get(n)
            items = f" ({sdk['items']} items)" if sdk else ""
            lines.append(
                f"| items at random gaps | {n} | {three(dispatch['sidecar'].get(n))} "
                f"| {three(floor.get(n))} | {three(sdk)}{items} |"
            )
        steps = [name for name in next(iter(floor.values()))["steps"]]
        header = " | ".join(f"N={n} sidecar | N={n} floor" for n in ns)
        lines += ["", f"| dispatch step, p50 (ms) | {header} |", "|---|" + "---:|" * (2 * len(ns))]
        for step in steps:
            cells = []
            for n in ns:
                for side in ("sidecar", "floor"):
                    cells.append(_fmt((dispatch[side].get(n) or {}).get("steps", {}).get(step), 2))
            lines.append(f"| {step} | {' | '.join(cells)} |")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}-min" if seconds >= 60 else f"{seconds:g}-s"


def _throughput(run: dict[str, Any]) -> str:
    if run.get("completed") == 0:
        return f"none completed in {run['seconds']:g} s"
    return _fmt(run["items_per_second"])


def _per_item(run: dict[str, Any] | None) -> str:
    if not run:
        return "-"
    per = run.get("requests_per_item", run)
    if not per.get("items", 1):
        return "- (none completed)"
    ops = per["by_operation"]
    parts = "+".join(_fmt(ops[op], 2 if ops[op] % 1 else 0) for op in ("poll", "ack", "heartbeat", "stop"))
    return f"{per['total']:.2f} ({parts})"


# -- plots ----------------------------------------------------------------------------------------------


def _grouped(ax: Any, figure: dict[str, Any], ns: list[str], value: Any, label: str, log: bool = False) -> None:
    width = 0.38
    for offset, (side, name) in zip((-width / 2, width / 2), SIDES, strict=True):
        values = [value(figure[side][n]) if n in figure.get(side, {}) else 0 for n in ns]
        bars = ax.bar([i + offset for i in range(len(ns))], values, width, label=name, color=COLORS[side])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    f = results["figures"]
    ns = [str(n) for n in results["meta"]["ns"]]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    _grouped(ax, f["idle_requests_per_minute"], ns, lambda r: r["per_minute"], "requests / min (log)", log=True)
    ax.set_title("Idle Work API requests per minute (no work queued)", fontsize=10)
    save(fig, "idle_requests.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    _grouped(axes[0], f["dispatch_latency"], ns, lambda r: r["p50_ms"] or 0, "p50 (ms, log)", log=True)
    axes[0].set_title("Dispatch latency p50", fontsize=10)
    _grouped(axes[1], f["dispatch_latency"], ns, lambda r: r["p99_ms"] or 0, "p99 (ms, log)", log=True)
    axes[1].set_title("Dispatch latency p99", fontsize=10)
    save(fig, "dispatch_latency.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    _grouped(ax, f["throughput"], ns, lambda r: r["items_per_second"], "items / s")
    ax.axhline(300, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title("Full-lifecycle throughput at saturation", fontsize=10)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 3.8))
    columns = [(f"short N={n}", side, f["requests_per_item"]["short"][side].get(n)) for n in ns for side, _ in SIDES]
    columns += [("long", side, f["requests_per_item"]["long"].get(side)) for side, _ in SIDES]
    bottoms = [0.0] * len(columns)
    palette = {"poll": "#90cdf4", "ack": "#9ae6b4", "heartbeat": "#f6ad55", "stop": "#fc8181", "other": "#cbd5e0"}
    for op, color in palette.items():
        heights = []
        for _, _, run in columns:
            per = (run or {}).get("requests_per_item", run or {})
            heights.append(per.get("by_operation", {}).get(op, 0.0))
        ax.bar(range(len(columns)), heights, bottom=bottoms, color=color, label=op)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(
        range(len(columns)),
        [f"{label}\n{'sidecar' if side == 'sidecar' else 'SDK'}" for label, side, _ in columns],
        fontsize=7,
    )
    ax.set_ylabel("Work API requests per item")
    ax.set_title("Requests per completed item", fontsize=10)
    ax.legend(fontsize=7, ncol=5)
    save(fig, "requests_per_item.png")

    holds = list(f["leases_held"].values())
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    labels = [f"{h['leases']:,}" for h in holds]
    for ax, key, title in (
        (axes[0], "lateness_p99_ms", "heartbeat lateness p99 (ms)"),
        (axes[1], "sidecar_cores", "sidecar CPU (cores)"),
        (axes[2], "rss_per_lease_kb", "RSS per lease (KB)"),
    ):
        values = [h[key] or 0 for h in holds]
        bars = ax.bar(labels, values, color=COLORS["sidecar"])
        ax.bar_label(bars, labels=[_fmt(v, 2) for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("leases held")
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[2].axhline(8, color="grey", linestyle="--", linewidth=0.8)
    save(fig, "leases_held.png")
    return written


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    (out / "latest.md").write_text(markdown(results))
    return [out / "latest.json", out / "latest.md", *plots(results, out)]
