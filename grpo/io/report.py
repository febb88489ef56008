"""`grpo report OUTPUT_DIR`: PNG plots of a run's curves and a one-page HTML summary, from metrics.jsonl alone.

Works on a finished or a running run, without wandb. Knows nothing of training.
"""

from __future__ import annotations

import fnmatch
import html
import json
from pathlib import Path

PANELS = [
    ("reward", ["reward", "reward/*"]),
    ("eval accuracy", ["eval/accuracy", "eval/pass@*"]),
    ("kl", ["kl"]),
    ("entropy", ["entropy"]),
    ("completion length", ["completion_length", "eval/completion_length"]),
    ("clip ratio", ["clip_ratio", "clip_ratio/low", "clip_ratio/high"]),
    ("step time (s)", ["step_time", "time/*"]),
]


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point grpo report at a run's train.output_dir")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], patterns: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """Metric name -> (steps, values) for the names matching `patterns` (error counts left out)."""
    names = sorted({k for r in records for k in r if k != "step" and not k.endswith("/errors")
                    and any(fnmatch.fnmatchcase(k, p) and (p != "reward/*" or k.count("/") == 1) for p in patterns)})
    out = {}
    for name in names:
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        if points:
            out[name] = ([s for s, _ in points], [v for _, v in points])
    return out


def write_report(output_dir: str | Path) -> Path:
    """Write OUTPUT_DIR/report/<panel>.png and OUTPUT_DIR/report/index.html; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    records = read_metrics(output_dir)
    folder = output_dir / "report"
    folder.mkdir(exist_ok=True)
    images = []
    for title, patterns in PANELS:
        data = series(records, patterns)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for name, (steps, values) in data.items():
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / (title.split(" (")[0].replace(" ", "_") + ".png")
        fig.savefig(path)
        plt.close(fig)
        images.append(path)
    (folder / "index.html").write_text(_html(output_dir, records, images))
    return folder / "index.html"


def _html(output_dir: Path, records: list[dict], images: list[Path]) -> str:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    rows = []
    for key in ["reward", "kl", "entropy", "completion_length", "clip_ratio", "step_time"]:
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        if values:
            rows.append(f"<tr><td>{key}</td><td>{values[0]:.4g}</td><td>{values[-1]:.4g}</td></tr>")
    for r in evals[:1] + evals[-1:] if len(evals) > 1 else evals:
        rows.append(f"<tr><td>eval/accuracy at step {r['step']}</td><td colspan=2>{r['eval/accuracy']:.4g}</td></tr>")
    sample = ""
    completions = output_dir / "completions.jsonl"
    if completions.is_file() and completions.stat().st_size:
        last = json.loads(completions.read_text().splitlines()[-1])
        items = "".join(f"<li>reward {c['reward']:.3g}, advantage {c['advantage']:+.3g}: <pre>{html.escape(c['completion'])}</pre></li>"
                        for c in last["completions"])
        sample = (f"<h2>Completions at step {last['step']}</h2><pre>{html.escape(last['prompt'])}</pre><ol>{items}</ol>")
    config = output_dir / "config.yaml"
    config_text = html.escape(config.read_text()) if config.is_file() else "(no config.yaml)"
    figures = "".join(f'<img src="{p.name}" alt="{p.stem}">' for p in images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>grpo run {html.escape(output_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{width:32%;min-width:380px}} td{{padding:2px 12px}}
pre{{background:#f4f4f4;padding:6px;white-space:pre-wrap}}</style></head><body>
<h1>{html.escape(output_dir.name)}</h1>
<p>{len(train)} training steps logged{', last at step ' + str(train[-1]['step']) if train else ''}.</p>
<table><tr><th>metric</th><th>first</th><th>last</th></tr>{''.join(rows)}</table>
{figures}{sample}
<h2>Config</h2><pre>{config_text}</pre></body></html>
"""
