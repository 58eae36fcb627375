"""Draw deploy/monitoring/dashboard.json's panels from a live Prometheus' answers, with matplotlib.

Not a Grafana screenshot: the same queries, as the live tests sent them to a real Prometheus scraping a real sidecar
(items, then a Work API outage) and a real KEDA scaler (readings, then failing reads), one subplot per panel, each
on the time of the run it comes from. Make the data, then the picture:

    mkdir -p /tmp/d && WORK_SIDECAR_DASHBOARD_DUMP=/tmp/d .venv/bin/pytest tests/deploy/test_monitoring.py -k live
    .venv/bin/python tools/render_dashboard.py /tmp/d/*.json docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "dashboard.json"


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    while "{{" in text:  # a label the series does not carry
        start = text.index("{{")
        text = text[:start] + text[text.index("}}", start) + 2 :]
    return " ".join(text.split()) or "value"


def render(dumps: list[dict[str, Any]], out: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    answers = {query["expr"]: query["result"] for dump in dumps for query in dump["queries"]}
    starts = {query["expr"]: float(dump["start"]) for dump in dumps for query in dump["queries"]}
    panels = [p for p in dashboard["panels"] if any(t["expr"] in answers for t in p["targets"])]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 2.9 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in answers.get(target["expr"], []):
                start = starts[target["expr"]]
                points = [(float(t) - start, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = _legend(target.get("legendFormat", ""), series["metric"])
                    axis.plot(xs, ys, label=label, linewidth=1.4, marker="o" if len(points) < 4 else None)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        axis.set_title(panel["title"], fontsize=10, loc="left")
        axis.set_ylabel({"s": "seconds", "ops": "per second"}.get(unit, ""), fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="upper left")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    for axis in axes[-1]:
        axis.set_xlabel("seconds into the run", fontsize=8)
    figure.suptitle(
        "work-sidecar dashboard (deploy/monitoring/dashboard.json) drawn with matplotlib from a live Prometheus' "
        "query_range answers in the runs of\ntests/deploy/test_monitoring.py: a sidecar (items, then a Work API "
        "outage) and a KEDA scaler (readings, then failing reads); not a Grafana screenshot",
        fontsize=9,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dumps", type=Path, nargs="+", help="the files the live tests wrote to WORK_SIDECAR_DASHBOARD_DUMP"
    )
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    render([json.loads(path.read_text()) for path in args.dumps], args.out)


if __name__ == "__main__":
    main()
