"""A small HTML report builder: sections, text, tables, figures, circuitsvis views and a findings
forest plot and verdict table, written as ``<out>/index.html`` (self-contained but for the views under ``<out>/views/``)
and ``<out>/results.json``. The research story that fills one lives in :mod:`emlens.demo`."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from emlens.findings import Comparison, Finding, Verdict, _nan  # noqa: E402


@dataclass
class Report:
    """Collects sections of HTML and a JSON-serialisable results dict."""

    title: str
    parts: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)  # emlens.findings.Finding
    views: dict[str, str] = field(default_factory=dict)  # file name -> standalone HTML

    def section(self, title: str, text: str = "") -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            self.parts.append(f"<p>{html.escape(text)}</p>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        if caption:
            self.parts.append(f"<p><i>{html.escape(caption)}</i></p>")
        self.parts.append(
            df.to_html(float_format=lambda x: f"{x:.3g}", border=0, classes="t", index=False)
        )

    def figure(self, fig, caption: str = "") -> None:
        self.parts.append(_figure_html(fig, caption))

    def view(self, view, name: str, caption: str = "", height: int = 260) -> None:
        """A circuitsvis view, written with its JavaScript inlined (works offline) to
        ``views/<name>.html`` and embedded as an iframe."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"view name {name!r}: use letters, digits, '-' and '_' only.")
        src = getattr(view, "local_src", None) or str(view)
        self.views[f"{name}.html"] = f"<!DOCTYPE html>\n<html><body>\n{src}\n</body></html>\n"
        self.parts.append(
            f'<figure><iframe src="views/{name}.html" style="width:100%;height:{height}px;'
            f'border:1px solid #ddd"></iframe><figcaption>{html.escape(caption)} '
            f'(<a href="views/{name}.html">open</a>)</figcaption></figure>'
        )

    def raw_html(self, snippet: str) -> None:
        self.parts.append(snippet)

    def finding(self, finding: Finding) -> None:
        """Add a :class:`emlens.findings.Finding`: drawn in the forest plot, one row of the
        verdict table, serialised into ``results.json`` (``results["findings"]``)."""
        if not isinstance(finding, Finding):
            raise TypeError(f"Report.finding takes an emlens.findings.Finding, got "
                            f"{type(finding).__name__}; build one with its comparisons.")
        if any(f.id == finding.id for f in self.findings):
            raise ValueError(f"A finding with id {finding.id!r} is already in the report.")
        self.findings.append(finding)

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        summary = "<h2>Which seed findings reproduced at this scale</h2>"
        if self.findings:
            summary += _forest_html(self.findings) + _verdict_table(self.findings)
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table.t{{border-collapse:collapse;margin:1em 0}} .t td,.t th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}}
img{{max-width:100%}} figcaption{{color:#555;font-size:13px}} details{{font-size:12px;color:#333}}
.v-reproduced{{color:#1a7f37}} .v-not{{color:#b42318}} .v-cannot{{color:#8a6d00}} .v-opposite{{color:#6e40c9}}</style></head><body>
<h1>{html.escape(self.title)}</h1>{summary}{''.join(self.parts)}</body></html>"""
        if self.views:
            (out / "views").mkdir(exist_ok=True)
            for name, src in self.views.items():
                (out / "views" / name).write_text(src)
        (out / "index.html").write_text(page)
        self.results["findings"] = [f.as_dict() for f in self.findings]
        (out / "results.json").write_text(json.dumps(_jsonable(self.results), indent=2))
        return out / "index.html"


_VERDICT_CLASS = {Verdict.REPRODUCED: "v-reproduced", Verdict.NOT_REPRODUCED: "v-not",
                  Verdict.CANNOT_DECIDE: "v-cannot", Verdict.OPPOSITE_SIGN: "v-opposite"}


def _verdict_table(findings: list[Finding]) -> str:
    """One row per finding: the claim, each lens's verdict, and the numbers behind one click
    away (a ``<details>`` with the evidence and every lens's effect, interval and control)."""
    rows = []
    for f in findings:
        verdicts = "<br>".join(
            f'{html.escape(c.name)}: <b class="{_VERDICT_CLASS[c.verdict]}">'
            f"{html.escape(c.verdict.value)}</b>" for c in f.comparisons)
        numbers = "".join(f"<li>{html.escape(lens_text(c.as_dict()))}</li>"
                          for c in f.comparisons)
        rows.append(
            f"<tr><td>{html.escape(f.claim)} <code>{html.escape(f.id)}</code><details><summary>numbers</summary><ul>{numbers}</ul>"
            f"<p>{html.escape(f.evidence)}</p></details></td><td>{verdicts}</td></tr>")
    return ("<table class='t'><tr><th>finding</th><th>verdict per lens</th></tr>"
            + "".join(rows) + "</table>")


def _figure_html(fig, caption: str) -> str:
    """A matplotlib figure as an inline PNG ``<figure>`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _forest_html(findings: list[Finding]) -> str:
    return _figure_html(plot_forest(findings), (
        "Every finding's effect (dot, 95% interval) beside its control (grey square), one panel "
        "per lens (each in its own units); the dashed line is no effect, the dotted one the "
        "smallest effect of interest on the side the claim predicts. Colour: the lens's verdict "
        "(green reproduced, red not reproduced, amber cannot decide, purple opposite sign)."))


_COLOURS = {Verdict.REPRODUCED: "#1a7f37", Verdict.NOT_REPRODUCED: "#b42318",
            Verdict.CANNOT_DECIDE: "#8a6d00", Verdict.OPPOSITE_SIGN: "#6e40c9"}


def plot_forest(findings: list[Finding]):
    """A forest plot of every finding's comparisons: one panel per lens family (the part of
    the lens name before ``" ("``, since units differ), one row per comparison labelled by the
    finding's id (and the direction it read), with the effect and its interval beside the
    control's, coloured by verdict; a finding with several comparisons in one panel labels each
    by its short name. Returns the figure."""
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, Comparison]]] = {}
    for f in findings:
        families = [c.lens.split(" (")[0] for c in f.comparisons]
        for c, family in zip(f.comparisons, families, strict=True):
            label = f.id + (f" ({c.direction} direction)" if c.direction else "")
            if not c.direction and families.count(family) > 1:
                label += f" ({c.name})"  # several rows of one finding in a panel: say which
            panels.setdefault(family, []).append((label, c))
    heights = [max(len(v), 1) * 0.32 + 0.7 for v in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (family, rows) in zip(axes[:, 0], panels.items(), strict=True):
        for y, (_label, c) in enumerate(reversed(rows)):
            e, colour = c.effect, _COLOURS[c.verdict]
            if c.control is not None and c.control.has_interval:
                ax.plot([c.control.low, c.control.high], [y - 0.18] * 2, color="#999", lw=2)
            if c.control is not None and not _nan(c.control.value):
                ax.plot(c.control.value, y - 0.18, "s", color="#999", ms=4)
            if e.has_interval:
                ax.plot([e.low, e.high], [y + 0.1] * 2, color=colour, lw=2.2)
            if not _nan(e.value):
                ax.plot(e.value, y + 0.1, "o", color=colour, ms=5)
            else:
                ax.text(c.null, y, " not measured", va="center", fontsize=7, color="#666")
        ax.axvline(rows[0][1].null, color="#444", ls="--", lw=0.8)
        deltas = {(c.null + c.sign * c.delta) for _, c in rows if c.delta}
        for x in deltas:
            ax.axvline(x, color="#888", ls=":", lw=0.8)
        ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=7)
        ax.set_title(family, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    fig.tight_layout()
    return fig


def lens_text(lens: dict) -> str:
    """``"<lens>: +0.12 [0.05, 0.20] (n=64) vs control +0.01 [-0.02, 0.04]"``."""
    def num(x):
        return "nan" if _nan(x) else f"{x:+.3f}"

    text = (f"{lens['lens']}: {num(lens['effect'])} [{num(lens['low'])}, {num(lens['high'])}] "
            f"(n={lens['n']})")
    control = lens.get("control")
    if control:
        text += (f" vs control {num(control['effect'])} [{num(control['low'])}, "
                 f"{num(control['high'])}]")
    if lens.get("verdict"):
        text += f": {lens['verdict']}"
    elif "supports_claim" in lens and lens["supports_claim"]:
        text += ": supports the claim"
    elif lens.get("separated"):
        text += f": separated, but not the predicted {lens.get('expected', 'sign')}"
    elif "separated" in lens:
        text += ": not separated"
    return text


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return _jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    return obj
