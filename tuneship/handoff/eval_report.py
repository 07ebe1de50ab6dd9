"""reports/NAME/report.json, the evaluation's output, typed for its writer (tuneship eval) and its
readers (the rendering, `make demo`, tests). Tolerant of unknown keys like the stage manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tuneship.handoff.manifest import ComputeInfo, Header, Section, read_manifest

REPORT_FILE = "report.json"
MODELS = ("base", "merged", "quantized")
TUNED = MODELS[1:]
Tally = tuple[int, int]  # (how many are true, of how many): what a share was measured on


class Counts(Section):
    recall: Tally
    recall_by_style: dict[str, Tally] = {}
    clause_cited: Tally = (0, 0)
    clause_cited_by_style: dict[str, Tally] = {}
    general: Tally = (0, 0)
    retention: Tally | None = None


class Figure(Section):
    """A share, what it was measured on and its 95% interval."""

    value: float | None
    count: Tally
    interval: tuple[float, float] | None = None


class ModelFigures(Section):
    label: str
    perplexity: float | None = None
    recall: float | None = None
    recall_by_style: dict[str, float | None] = {}
    clause_cited: float | None = None
    clause_cited_by_style: dict[str, float | None] = {}
    general_accuracy: float | None = None
    retention: float | None = None
    counts: Counts
    stop_rate: float | None = None
    mean_answer_tokens: float | None = None
    latency_mean_s: float
    latency_p95_s: float | None = None
    output_tokens_per_s: float | None = None
    load_s: float | None = None
    peak_rss_bytes: int | None = None
    tools: dict[str, Figure] = Field(
        default_factory=dict, description="Tool-call figures on the tool prompts, by name."
    )


class Target(Section):
    target: str
    goal: str
    value: float | None
    unit: str
    met: bool
    count: Tally | None = None
    interval: tuple[float, float] | None = None
    rule: str | None = Field(None, description="Which rule set this target, and why.")


class ModelAnswer(Section):
    text: str | None
    ok: bool
    cited: bool | None = None
    finish_reason: str | None = None


class AnswerRow(Section):
    id: str
    kind: str
    question: str
    expected: list[str]
    clause: str | None = None
    base: ModelAnswer
    merged: ModelAnswer
    quantized: ModelAnswer

    def by_model(self, model: str) -> ModelAnswer:
        return getattr(self, model)


class ToolReply(Section):
    calls: list[dict[str, str]] = Field(default_factory=list, description="name, arguments")
    text: str | None = None
    right: bool | None = Field(None, description="The expected call (None: none expected).")
    ok: bool = Field(description="Right: the expected call, or no call (with the fact).")


class ToolAnswerRow(Section):
    id: str
    kind: str
    prompt: str = Field(description="The last user turn.")
    expected: str = Field(description="The expected call, or what a reply without one says.")
    base: ToolReply
    merged: ToolReply
    quantized: ToolReply

    def by_model(self, model: str) -> ToolReply:
        return getattr(self, model)


class ReferenceAnswer(Section):
    id: str
    text: str | None
    ok: bool


class BaseIn4Bit(Section):
    """The base model through the bundle's own recipe (`quantized_base`)."""

    scales_tuned: bool = False  # its scales tuned as the bundle's were (scale tuning)
    general_accuracy: float | None
    retention: float | None
    bundle_retention: float | None
    counts: dict[str, Tally]
    answers: list[ReferenceAnswer] = []


class ReportData(Section):
    heldout: str
    heldout_questions: int
    general: str | None = None
    general_questions: int = 0
    tools: str | None = None
    tool_prompts: int = 0
    tool_parser: str | None = None


class EvalReport(Header):
    kind: Literal["tuneship.report"]
    bundle: str
    run: str
    base: str
    data: ReportData
    config: dict[str, Any]
    compute: ComputeInfo | None = Field(
        None, description="What the merge and the perplexities computed in, and why."
    )
    served: dict[str, str] = Field(
        default_factory=dict, description="How vLLM served each model (dtype, weights)."
    )
    models: dict[str, ModelFigures]
    targets: list[Target]
    reference: dict[str, BaseIn4Bit] = {}
    answers: list[AnswerRow]
    tool_answers: list[ToolAnswerRow] = []
    seconds: dict[str, float] = {}

    @property
    def base_w4a16(self) -> BaseIn4Bit | None:
        return self.reference.get("base_w4a16")


def read_report(report_dir: Path) -> EvalReport:
    return read_manifest(
        Path(report_dir) / REPORT_FILE,
        EvalReport,
        "eval report",
        "is this a `tuneship eval` report?",
    )
