"""`grpo report RUN_DIR`: one self-contained HTML file (no network needed to view it) with the run's config,
its curves as inline SVG, and a browser of sampled completions by step (from completions.jsonl)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from grpo.plot import PANELS, read_metrics, series

WIDTH, HEIGHT, PAD = 360, 200, 36


def svg_chart(title: str, lines: list[tuple[str, list[int], list[float]]]) -> str:
    """A line chart as inline SVG: one polyline per (label, steps, values), min/max of each axis labelled."""
    xs = [x for _, steps, _ in lines for x in steps]
    ys = [y for _, _, values in lines for y in values]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def point(x: float, y: float) -> str:
        px = PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
        py = HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)
        return f"{px:.1f},{py:.1f}"

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
             f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" class="frame"/>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end" class="tick">{y1:.3g}</text>',
             f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end" class="tick">{y0:.3g}</text>',
             f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" class="tick">{x0}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" text-anchor="end" class="tick">step {x1}</text>']
    for i, (label, steps, values) in enumerate(lines):
        color = colors[i % len(colors)]
        points = " ".join(point(x, y) for x, y in zip(steps, values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{points}">'
                     f'<title>{html.escape(label)}</title></polyline>')
        if len(lines) > 1:
            parts.append(f'<text x="{WIDTH - PAD}" y="{PAD + 12 + 11 * i}" text-anchor="end" class="legend" '
                         f'fill="{color}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def build_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config_path = run_dir / "grpo_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    completions_path = run_dir / "completions.jsonl"
    completions = ([json.loads(line) for line in completions_path.read_text().splitlines() if line.strip()]
                   if completions_path.exists() else [])

    reward_keys = sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    panels = PANELS[:1] + [(k.split("/")[1], [k]) for k in reward_keys] + PANELS[1:]
    charts = []
    for title, keys in panels:
        lines = [(key.split("/")[-1], *series(records, key)) for key in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            charts.append(svg_chart(title, lines))
    config_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                          for k, v in config.items())
    last = records[-1] if records else {}
    summary = (f"{len(records)} logged steps; last step {last.get('step', '-')}: reward "
               f"{last.get('reward', float('nan')):.4g}" if records else "no metrics logged")
    data = json.dumps(completions).replace("</", "<\\/")  # keep the JSON inside its script element
    return TEMPLATE.format(title=html.escape(f"grpo run: {run_dir.name}"), summary=html.escape(summary),
                           charts="\n".join(charts), config_rows=config_rows, completions_json=data)


def write_report(run_dir: str | Path, output: str | None = None) -> Path:
    path = Path(output) if output else Path(run_dir) / "report.html"
    path.write_text(build_report(run_dir), encoding="utf-8")
    return path


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.chart {{ background: #fff; border: 1px solid #ddd; }}
.chart .title {{ font-size: 13px; font-weight: 600; }} .chart .tick, .chart .legend {{ font-size: 10px; }}
.chart .frame {{ fill: none; stroke: #bbb; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ddd; padding: 3px 6px;
  text-align: left; vertical-align: top; }}
#completions td {{ white-space: pre-wrap; max-width: 520px; }} details {{ margin: 12px 0; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
<h2>Curves</h2>
<div class="charts">
{charts}
</div>
<h2>Sampled completions</h2>
<p><label>Step <select id="step"></select></label> <span id="count"></span></p>
<table id="completions"><thead></thead><tbody></tbody></table>
<details><summary>Config</summary><table>{config_rows}</table></details>
<script id="completions-data" type="application/json">{completions_json}</script>
<script>
const rows = JSON.parse(document.getElementById("completions-data").textContent);
const select = document.getElementById("step");
const steps = [...new Set(rows.map(r => r.step))];
const cell = v => typeof v === "number" ? v.toFixed(3) : (v === null ? "-" : String(v));
function show(step) {{
  const picked = rows.filter(r => r.step === step);
  const columns = picked.length ? Object.keys(picked[0]).filter(c => c !== "step") : [];
  document.querySelector("#completions thead").innerHTML =
    "<tr>" + columns.map(c => "<th></th>").join("") + "</tr>";
  document.querySelectorAll("#completions thead th").forEach((th, i) => th.textContent = columns[i]);
  const body = document.querySelector("#completions tbody");
  body.replaceChildren(...picked.map(r => {{
    const tr = document.createElement("tr");
    columns.forEach(c => {{ const td = document.createElement("td"); td.textContent = cell(r[c]); tr.append(td); }});
    return tr;
  }}));
  document.getElementById("count").textContent = picked.length + " completions";
}}
if (steps.length) {{
  steps.forEach(s => select.add(new Option(s, s)));
  select.value = steps[steps.length - 1];
  select.onchange = () => show(Number(select.value));
  show(steps[steps.length - 1]);
}} else {{
  document.getElementById("count").textContent = "none logged: train with log_completions=True to browse them";
}}
</script>
</body></html>
"""
