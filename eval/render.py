"""The evaluation report: plots (PNG), report.md, self-contained report.html, console summary."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

from tuneship.handoff.eval_report import (
    MODELS,
    REPORT_FILE,
    TUNED,
    AnswerRow,
    BaseIn4Bit,
    EvalReport,
    Figure,
    ModelFigures,
    Target,
    ToolReply,
)
from tuneship.handoff.manifest import RunManifest, write_manifest
from tuneship.infra.plots import loss_chart

from .figures import TOOL_FIGURES

COLOURS = {"base": "#9e9e9e", "merged": "#1f77b4", "quantized": "#ff7f0e"}


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{unit}"


def has_clauses(models: dict[str, ModelFigures]) -> bool:
    """Whether the held-out questions named clauses (else no "clause cited" figures)."""
    return any(models[m].clause_cited is not None for m in MODELS)


def metric_rows(report: EvalReport) -> list[tuple[str, list[str]]]:
    """(metric, one cell per model) in the order the tables show them."""
    models = report.models
    styles = sorted({s for m in models.values() for s in m.recall_by_style})
    rows = [("held-out fact recall", [pct(models[m].recall) for m in MODELS])]
    rows += [
        (f"  {style} questions", [pct(models[m].recall_by_style.get(style)) for m in MODELS])
        for style in styles
    ]
    if has_clauses(models):
        by_style = {m: models[m].clause_cited_by_style for m in MODELS}
        rows.append(("right clause cited", [pct(models[m].clause_cited) for m in MODELS]))
        rows += [
            (f"  {style} questions", [pct(by_style[m].get(style)) for m in MODELS])
            for style in sorted({s for cells in by_style.values() for s in cells})
        ]
    rows += [
        ("general questions answered", [pct(models[m].general_accuracy) for m in MODELS]),
        ("general knowledge retained", ["-", *(pct(models[m].retention) for m in TUNED)]),
        *base_in_4bit_rows(report.base_w4a16),
        ("held-out perplexity (reference answers)", [num(models[m].perplexity) for m in MODELS]),
        ('finish_reason "stop"', [pct(models[m].stop_rate) for m in MODELS]),
        ("mean answer length (tokens)", [num(models[m].mean_answer_tokens) for m in MODELS]),
        ("latency mean / p95 (s)", [
            f"{models[m].latency_mean_s:.2f} / {models[m].latency_p95_s or 0:.2f}" for m in MODELS
        ]),
        ("output tokens/s", [num(models[m].output_tokens_per_s) for m in MODELS]),
        ("vLLM start-up (s)", [num(models[m].load_s) for m in MODELS]),
    ]  # fmt: skip
    if models["merged"].tools:
        rows += [
            (f"tool prompts: {what}", [tool_cell(models[m].tools.get(key)) for m in MODELS])
            for key, what in TOOL_FIGURES.items()
        ]
    return rows


def tool_cell(figure: Figure | None) -> str:
    if figure is None or figure.value is None:
        return "n/a"
    (hits, of), (low, high) = figure.count, figure.interval or (0.0, 1.0)
    return f"{figure.value:.0%} ({hits} of {of}; {low:.0%}-{high:.0%})"


def base_in_4bit_rows(figures: BaseIn4Bit | None) -> list[tuple[str, list[str]]]:
    """`quantized_base`: the base model through the bundle's recipe, beside the base column."""
    if not figures:
        return []

    def counted(key: str) -> str:
        hits, of = figures.counts[key]
        return f"{pct(getattr(figures, key))} ({hits} of {of})"

    how = " (scales tuned)" if figures.scales_tuned else ""
    return [
        (f"  the base itself in W4A16{how}", [counted("retention"), "-", "-"]),
        ("  against the base in W4A16", ["-", "-", counted("bundle_retention")]),
    ]


def recall_of_style(style: str) -> Callable[[ModelFigures], float | None]:
    return lambda m: m.recall_by_style.get(style)


def plot_quality(report: EvalReport, path: Path) -> None:
    """Bars per model: recall (all and per style), clause cited, general accuracy, retention,
    stop rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report.models
    styles = sorted({s for m in models.values() for s in m.recall_by_style})
    groups: list[tuple[str, Callable[[ModelFigures], float | None]]] = [
        ("held-out recall", lambda m: m.recall)
    ]
    groups += [(f"recall: {s}", recall_of_style(s)) for s in styles]
    if has_clauses(models):
        groups.append(("clause cited", lambda m: m.clause_cited))
    groups += [
        ("general answered", lambda m: m.general_accuracy),
        ("general retained", lambda m: m.retention),
        ('finish "stop"', lambda m: m.stop_rate),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.4), dpi=100)
    width = 0.8 / len(MODELS)
    for k, model in enumerate(MODELS):
        values = [get(models[model]) for _, get in groups]
        xs = [g + (k - 1) * width for g in range(len(groups))]
        bars = ax.bar(
            xs, [v or 0 for v in values], width, label=models[model].label, color=COLOURS[model]
        )
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                ax.annotate(
                    f"{value:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    target = report.config["targets"]["min_recall"]
    ax.axhline(
        target, color="green", linestyle="--", linewidth=1, label=f"recall target {target:.0%}"
    )
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of questions")
    ax.set_title("answers through the OpenAI-compatible endpoint (vLLM, greedy)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_serving(report: EvalReport, path: Path) -> None:
    """Perplexity, latency and answer length per model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report.models
    panels = [
        ("held-out perplexity", "perplexity"),
        ("mean latency (s)", "latency_mean_s"),
        ("mean answer length (tokens)", "mean_answer_tokens"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.2), dpi=100)
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [getattr(models[m], key) or 0 for m in MODELS]
        ax.bar([m for m in MODELS], values, color=[COLOURS[m] for m in MODELS])
        for x, value in enumerate(values):
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(report: EvalReport, run: RunManifest, folder: Path) -> list[str]:
    """The run's loss curves (from run.json), answer quality and serving figures."""
    curves = loss_chart(
        run.metrics.loss, run.metrics.eval_loss, folder / "loss.png", f"run {run.name}"
    )
    plot_quality(report, folder / "quality.png")
    plot_serving(report, folder / "serving.png")
    return [*(["loss.png"] if curves else []), "quality.png", "serving.png"]


def measured(target: Target) -> str:
    """The value, and for a share what it was measured on and its 95% interval."""
    value = target.value
    if value is None:
        return "n/a"
    if target.unit == "points":
        return f"{value:g}"
    if target.count is None or target.interval is None:
        return f"{value:.0%}"
    (hits, of), (low, high) = target.count, target.interval
    return f"{value:.0%} ({hits} of {of}; 95% interval {low:.0%}-{high:.0%})"


def must_contain(answer: AnswerRow) -> str:
    facts = " / ".join(answer.expected)
    return f"{facts}; cites {answer.clause}" if answer.clause else facts


def md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def compute_lines(report: EvalReport) -> list[str]:
    """What the evaluation computed in, on what, and how vLLM served each model."""
    lines = []
    if report.compute is not None:
        c = report.compute
        lines.append(f"Merge and perplexities in {c.precision} on {c.machine} ({c.reason}).")
    lines += [f"{report.models[m].label}: served {how}." for m, how in report.served.items()]
    return lines


def markdown(report: EvalReport, plots: list[str]) -> str:
    models, data = report.models, report.data
    lines = [
        f"# Evaluation of `{report.bundle}`",
        "",
        f"Base `{report.base}`, run `{report.run}`. {data.heldout_questions} held-out "
        f"questions from `{data.heldout}`"
        + (
            f", {data.general_questions} general questions from `{data.general}`."
            if data.general
            else "."
        )
        + (
            f" {data.tool_prompts} held-out tool prompts from `{data.tools}`, served with "
            f"vLLM's `{data.tool_parser}` tool parser at tool_strict_level "
            f"`{report.config.get('tool_strict_level', 'auto')}` and the run's chat template "
            "(the base too); shares with their counts and 95% intervals."
            if data.tools
            else ""
        )
        + f" Each model served by vLLM and asked through the OpenAI-compatible chat endpoint "
        f"(greedy, at most {report.config['max_tokens']} tokens, "
        f"{report.config['concurrency']} requests in flight); perplexity computed locally on "
        "the reference answers' tokens.",
        "",
        *(f"- {line}" for line in compute_lines(report)),
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "| --- | --- | --- | --- |",
    ]
    for t in report.targets:
        verdict = "met" if t.met else "MISSED"
        lines.append(f"| {t.target} | {t.goal} | {measured(t)} | {verdict} |")
    lines += ["", *(f"- {t.target}: judged {t.rule}." for t in report.targets if t.rule)]
    lines += ["", "## Metrics", "", "| | " + " | ".join(models[m].label for m in MODELS) + " |"]
    lines.append("| --- |" + " --- |" * len(MODELS))
    for name, cells in metric_rows(report):
        lines.append(
            f"| {name.strip() if not name.startswith('  ') else '&nbsp;&nbsp;' + name.strip()} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [""] + [f"![{p}]({p})" for p in plots]
    shown = report.config["shown"]
    lines += [
        "",
        f"## Answers side by side (first {shown} of each kind; all in report.html and report.json)",
        "",
        "| question | must contain | " + " | ".join(models[m].label for m in MODELS) + " |",
        "| --- | --- |" + " --- |" * len(MODELS),
    ]
    for kind in dict.fromkeys(a.kind for a in report.answers):
        for answer in [a for a in report.answers if a.kind == kind][:shown]:
            cells = [
                f"{'✓' if answer.by_model(m).ok else '✗'} {md_cell(answer.by_model(m).text or '')}"
                for m in MODELS
            ]
            expected = md_cell(must_contain(answer))
            question = md_cell(answer.question)
            lines.append(f"| ({kind}) {question} | {expected} | " + " | ".join(cells) + " |")
    if report.tool_answers:
        lines += [
            "",
            f"## Tool calls side by side (first {shown} of each kind; all in report.html and "
            "report.json)",
            "",
            "| prompt | expected | " + " | ".join(models[m].label for m in MODELS) + " |",
            "| --- | --- |" + " --- |" * len(MODELS),
        ]
        for kind in dict.fromkeys(a.kind for a in report.tool_answers):
            for row in [a for a in report.tool_answers if a.kind == kind][:shown]:
                cells = [tool_reply_text(row.by_model(m)) for m in MODELS]
                lines.append(
                    f"| ({kind}) {md_cell(row.prompt)} | {md_cell(row.expected)} | "
                    + " | ".join(md_cell(c) for c in cells)
                    + " |"
                )
    seconds = ", ".join(f"{k} {v} s" for k, v in report.seconds.items())
    lines += ["", f"Time: {seconds}.", ""]
    return "\n".join(lines)


def tool_reply_text(reply: ToolReply) -> str:
    """A reply to a tool prompt in one line: ✓/✗, then its calls or its text."""
    said = "; ".join(f"{c['name']}({c['arguments']})" for c in reply.calls) or reply.text or ""
    return f"{'✓' if reply.ok else '✗'} {said}"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}.ok{background:#e8f5e9}.bad{background:#ffebee}
.met{color:#1b5e20;font-weight:bold}.missed{color:#b71c1c;font-weight:bold}
img{max-width:100%;display:block;margin:1em 0}td.answer{max-width:320px}
"""


def html_report(report: EvalReport, folder: Path, plots: list[str]) -> str:
    e = html.escape
    models = report.models
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tuneship eval: {e(report.bundle)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Evaluation of <code>{e(report.bundle)}</code></h1>",
        f"<p>Base <code>{e(report.base)}</code>, run <code>{e(report.run)}</code>; "
        f"{report.data.heldout_questions} held-out and "
        f"{report.data.general_questions} general questions, each model served by vLLM "
        "and asked through the OpenAI-compatible endpoint (greedy).</p><ul>",
        *(f"<li>{e(line)}</li>" for line in compute_lines(report)),
        "</ul>",
        "<h2>Targets</h2><table><tr><th>target</th><th>goal</th><th>measured</th><th></th></tr>",
    ]
    for t in report.targets:
        verdict = "<span class='met'>met</span>" if t.met else "<span class='missed'>MISSED</span>"
        parts.append(
            f"<tr><td>{e(t.target)}</td><td>{e(t.goal)}</td>"
            f"<td>{measured(t)}</td><td>{verdict}</td></tr>"
        )
    parts.append("</table><ul>")
    parts += [f"<li>{e(t.target)}: judged {e(t.rule)}.</li>" for t in report.targets if t.rule]
    parts.append("</ul><h2>Metrics</h2><table><tr><th></th>")
    parts += [f"<th>{e(models[m].label)}</th>" for m in MODELS]
    parts.append("</tr>")
    for name, cells in metric_rows(report):
        indent = "&nbsp;&nbsp;&nbsp;" if name.startswith("  ") else ""
        parts.append(
            f"<tr><td>{indent}{e(name.strip())}</td>"
            + "".join(f"<td>{e(c)}</td>" for c in cells)
            + "</tr>"
        )
    parts.append("</table>")
    for plot in plots:
        data = base64.b64encode((folder / plot).read_bytes()).decode()
        parts.append(f"<img alt='{e(plot)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Answers side by side</h2><table><tr>")
    parts += [f"<th>{column}</th>" for column in ("kind", "question", "must contain")]
    parts += [f"<th>{e(models[m].label)}</th>" for m in MODELS]
    parts.append("</tr>")
    for answer in report.answers:
        parts.append(
            f"<tr><td>{e(answer.kind)}</td><td>{e(answer.question)}</td>"
            f"<td>{e(must_contain(answer))}</td>"
        )
        for m in MODELS:
            cls = "ok" if answer.by_model(m).ok else "bad"
            parts.append(f"<td class='answer {cls}'>{e(answer.by_model(m).text or '')}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    if report.tool_answers:
        parts.append("<h2>Tool calls side by side</h2><table><tr>")
        parts += [f"<th>{column}</th>" for column in ("kind", "prompt", "expected")]
        parts += [f"<th>{e(models[m].label)}</th>" for m in MODELS]
        parts.append("</tr>")
        for row in report.tool_answers:
            parts.append(
                f"<tr><td>{e(row.kind)}</td><td>{e(row.prompt)}</td><td>{e(row.expected)}</td>"
            )
            for m in MODELS:
                reply = row.by_model(m)
                cls = "ok" if reply.ok else "bad"
                parts.append(f"<td class='answer {cls}'>{e(tool_reply_text(reply)[2:])}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: EvalReport, run: RunManifest, folder: Path) -> None:
    """report.json, the plots, report.md and report.html into folder."""
    write_manifest(folder / REPORT_FILE, report)
    plots = write_plots(report, run, folder)
    (folder / "report.md").write_text(markdown(report, plots), encoding="utf-8")
    (folder / "report.html").write_text(html_report(report, folder, plots), encoding="utf-8")


def summary(report: EvalReport, out_dir: Path) -> str:
    """A few lines for the console: the targets and the headline figures per model."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="tuneship eval", show_lines=False)
    table.add_column("")
    for m in MODELS:
        table.add_column(report.models[m].label)
    for name, cells in metric_rows(report):
        table.add_row(name, *cells)
    buffer = StringIO()
    console = Console(file=buffer, width=120, force_terminal=False)
    console.print(table)
    for t in report.targets:
        verdict = "met   " if t.met else "MISSED"
        console.print(f"{verdict} {t.target}: {measured(t)} (goal {t.goal})")
        if t.rule:
            console.print(f"       judged {t.rule}")
    console.print(f"report: {out_dir / 'report.html'} (and report.md, report.json)")
    return buffer.getvalue()
