"""The rows bench/run.py collects, the one table it prints, the targets and the PNG chart.

A `Row` is one figure of one path in one scenario case: a rate (pps and bits/s, each a
`common.summary`: median with range) or another figure (`value`, e.g. a latency), its
ratios to the peers measured in the same run (`ratios`: peer name -> median / median),
and, when the issue sets one, the target it is held against (`target`, `met`). A path
that could not run has `error` (why) and no figures: the run goes on.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import fmt, table


@dataclass
class Row:
    scenario: str
    case: str
    path: str
    pps: dict | None = None
    bits: dict | None = None
    value: str | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    target: str | None = None
    met: bool | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(a: dict | None, b: dict | None) -> float | None:
    """Median of a over median of b; None when either has no figure."""
    if not a or not b or not a.get("runs") or not b.get("runs") or not b["median"]:
        return None
    return a["median"] / b["median"]


def first_line(text: str, limit: int = 70) -> str:
    """The last non-empty line of an error (where a log ends is why it ended), without a
    log line's `time|module|LEVEL|` prefix, shortened."""
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    line = re.sub(r"^\S+\|[\w.]+\|[A-Z]+\|", "", lines[-1]) if lines else "failed"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _ratios(r: Row) -> str:
    parts = []
    for peer, x in r.ratios.items():
        parts.append(f"{x:.3g}x {peer}" if x is not None else f"n/a {peer}")
    return "; ".join(parts) or "-"


def _target(r: Row) -> str:
    if r.target is None:
        return ""
    verdict = {True: "met", False: "MISSED", None: "not measured"}[r.met]
    return f"{r.target}: {verdict}"


def render(rows: list[Row]) -> str:
    """One fixed-width table of every row, then the full reason of each failed row."""
    out, failures = [], []
    for r in rows:
        if r.error is not None:
            failures.append(f"  [{len(failures) + 1}] {r.scenario} / {r.case} / {r.path}: "
                            + " | ".join(x.strip() for x in r.error.strip().splitlines()[-6:]))
            rate, bits = f"FAILED [{len(failures)}]: {first_line(r.error)}", ""
        elif r.pps is not None:
            rate = fmt(r.pps, "pps")
            bits = fmt(r.bits, "bit/s") if r.bits else ""
        else:
            rate, bits = r.value or "", ""
        out.append([r.scenario, r.case, r.path, rate, bits, _ratios(r), _target(r)])
    text = table(["scenario", "case", "path", "rate or figure", "bits/s", "ratio to peer",
                  "target"], out)
    if failures:
        text += "\nfailed rows:\n" + "\n".join(failures)
    return text


def targets(rows: list[Row]) -> str:
    """The rows that carry a target, one line each: met, missed (by how much) or not run."""
    lines = []
    for r in rows:
        if r.target is None:
            continue
        state = ("NOT RUN: " + first_line(r.error, 100)) if r.error else \
            {True: "met", False: "MISSED", None: "not measured"}[r.met]
        figure = _ratios(r) if r.ratios else (r.value or "")
        lines.append(f"- {r.scenario} / {r.case} / {r.path}: {r.target}: {state} ({figure})")
    return "\n".join(lines)


def chart(rows: list[Row], path: Path, title: str) -> str:
    """A PNG of every ratio in the rows (one horizontal bar each, grouped by scenario), with
    1.0 marked; returns what was written, or why not (matplotlib is the optional `bench`
    extra: `pip install -e '.[bench]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[bench]')"
    labels, values, colours = [], [], []
    palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]
    scenarios: list[str] = []
    for r in rows:
        if not r.path.startswith("pyswitch") or r.extra.get("baseline"):
            continue  # peers against each other, and a dimension's 1.0 by definition
        for peer, x in r.ratios.items():
            if x is None:
                continue
            if r.scenario not in scenarios:
                scenarios.append(r.scenario)
            labels.append(f"{r.case} | {r.path} / {peer}")
            values.append(x)
            colours.append(palette[scenarios.index(r.scenario) % len(palette)])
    if not values:
        return "no chart: no ratio was measured"
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(values) + 1.6))
    ys = range(len(values))[::-1]
    ax.barh(list(ys), values, color=colours)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in zip(ys, values, strict=True):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i % len(palette)])
               for i in range(len(scenarios))]
    ax.legend(handles, scenarios, fontsize=7, loc="lower right")
    ax.set_xlabel("ratio (log scale): pyswitch / peer, or rate / the dimension's smallest case")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"
