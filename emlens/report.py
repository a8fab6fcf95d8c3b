"""A small HTML report builder: sections, text, tables, figures, circuitsvis views and a findings
table, written as ``<out>/index.html`` (self-contained but for the views under ``<out>/views/``)
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


@dataclass
class Report:
    """Collects sections of HTML and a JSON-serialisable results dict."""

    title: str
    parts: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    # (claim, verdict, evidence, lenses): lenses is a list of {lens, effect, low, high, n, control}
    findings: list[tuple[str, str, str, list]] = field(default_factory=list)
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
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

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

    def finding(self, claim: str, verdict: str, evidence: str,
                lenses: list[dict] | None = None) -> None:
        """One row of the findings table. ``lenses``: each lens that measured the claim, as
        ``{"lens", "effect", "low", "high", "n", "control"}`` (``control``: the same for the random
        control, or ``None``); shown beside the evidence and kept in ``results.json``."""
        for i, lens in enumerate(lenses or []):
            missing = {"lens", "effect", "low", "high", "n", "control"} - set(lens)
            if missing:
                raise ValueError(f"lenses[{i}] of {claim!r} lacks {sorted(missing)}.")
        self.findings.append((claim, verdict, evidence, list(lenses or [])))

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        rows = "".join(
            f"<tr><td>{html.escape(c)}</td><td><b>{html.escape(v)}</b></td><td>{html.escape(e)}</td>"
            f"<td>{'<br>'.join(html.escape(lens_text(x)) for x in lenses)}</td></tr>"
            for c, v, e, lenses in self.findings
        )
        summary = (
            "<h2>Which seed findings reproduced at this scale</h2><table class='t'>"
            "<tr><th>finding</th><th>here</th><th>evidence</th><th>lenses (effect [95%] vs "
            "control)</th></tr>" + rows + "</table>"
        )
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table.t{{border-collapse:collapse;margin:1em 0}} .t td,.t th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
img{{max-width:100%}} figcaption{{color:#555;font-size:13px}}</style></head><body>
<h1>{html.escape(self.title)}</h1>{summary}{''.join(self.parts)}</body></html>"""
        if self.views:
            (out / "views").mkdir(exist_ok=True)
            for name, src in self.views.items():
                (out / "views" / name).write_text(src)
        (out / "index.html").write_text(page)
        self.results["findings"] = [dict(claim=c, verdict=v, evidence=e, lenses=lenses)
                                    for c, v, e, lenses in self.findings]
        (out / "results.json").write_text(json.dumps(_jsonable(self.results), indent=2))
        return out / "index.html"


def lens_text(lens: dict) -> str:
    """``"<lens>: +0.12 [0.05, 0.20] (n=64) vs control +0.01 [-0.02, 0.04]"``."""
    def num(x):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"

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
