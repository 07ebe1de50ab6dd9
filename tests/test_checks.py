"""The checks' judging logic (tuneship/quality/verdicts.py): template parity, stop rate, recall,
quality gate; the check plan's training ids (export/check_plan.py); held-out question files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneship.chat.labels import ChatTokenizer
from tuneship.config.schema import ExportConfig
from tuneship.export.check_plan import trained_ids
from tuneship.handoff.manifest import Check, CheckPlan, CheckPrompt
from tuneship.infra.errors import TuneshipError
from tuneship.quality import probes, verdicts
from tuneship.quality.facts import cites_clause, contains_fact, recall
from tuneship.quality.probes import ProbeAnswer

ITEM = probes.EvalItem("q1", ({"role": "user", "content": "Meal allowance?"},), "It is $62.", "$62")


def served_prompt(tokenizer, item):
    ids = tokenizer.apply_chat_template(list(item.messages), add_generation_prompt=True)
    return list(getattr(ids, "input_ids", ids))


def check_prompt(tokenizer, item) -> CheckPrompt:
    """What the export records for a prompt: the ids training uses for it and a reply."""
    ids = trained_ids(ChatTokenizer(tokenizer), item)
    return CheckPrompt(id=item.id, messages=list(item.messages), trained_ids=ids)


def test_template_parity_passes_on_identical_ids_and_names_mismatches(chatml_tokenizer):
    prompt = check_prompt(chatml_tokenizer, ITEM)
    good = served_prompt(chatml_tokenizer, ITEM)
    result = verdicts.template_parity([prompt], [good], chatml_tokenizer.bos_token_id)
    assert result.passed and result.mismatched == 0
    # a server rendering a different system prompt (another template) is caught
    other = [*good[:3], good[3] + 1, *good[4:]]
    result = verdicts.template_parity([prompt], [other], chatml_tokenizer.bos_token_id)
    assert not result.passed and result.mismatched_ids == ["q1"]


def test_template_parity_catches_a_double_bos():
    from tests.support import LLAMA3, build_tokenizer

    tokenizer = build_tokenizer(LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>")
    prompt, bos = check_prompt(tokenizer, ITEM), tokenizer.bos_token_id
    served = served_prompt(tokenizer, ITEM)
    assert verdicts.template_parity([prompt], [served], bos).passed
    result = verdicts.template_parity([prompt], [[bos, *served]], bos)
    assert not result.passed and result.double_bos_ids == ["q1"]


def test_template_parity_passes_a_bos_that_is_also_the_eos():
    """OLMo 2's BOS and eos are one token, which also ends each reply: the training ids of a
    prompt and its reply hold it twice, once at the start (the family matrix found this)."""
    from tests.families import FAMILY_SPECIALS, OLMO2
    from tests.support import build_tokenizer

    tokenizer = build_tokenizer(OLMO2, "<|endoftext|>", "<|endoftext|>", FAMILY_SPECIALS)
    prompt, bos = check_prompt(tokenizer, ITEM), tokenizer.bos_token_id
    assert prompt.trained_ids.count(bos) == 2
    assert verdicts.template_parity([prompt], [served_prompt(tokenizer, ITEM)], bos).passed
    doubled = verdicts.template_parity([prompt], [[bos, *served_prompt(tokenizer, ITEM)]], bos)
    assert not doubled.passed


def test_stop_rate_threshold():
    def answer(id_: str, finish: str) -> ProbeAnswer:
        return ProbeAnswer(id=id_, model="m", text="", finish_reason=finish, latency_s=0.1)

    chats = [answer(str(i), "stop") for i in range(19)]
    assert verdicts.stop_rate([*chats, answer("x", "length")], 0.95, 64).passed
    result = verdicts.stop_rate(chats + [answer("x", "length")] * 2, 0.95, 64)
    assert not result.passed and result.not_stopped_ids == ["x", "x"]


def test_fact_matching_is_whole_token():
    assert contains_fact("It is $62 per day.", "$62")
    assert not contains_fact("It is $625 per day.", "$62")
    assert not contains_fact("It is 62 dollars.", "$62")
    assert contains_fact("根据政策,每日餐费补贴为 $62。", "$62")
    assert recall(["Paris!", "no idea"], [["Paris"], "Tokyo"]) == 0.5


def test_a_clause_is_cited_by_its_exact_id():
    assert cites_clause("Under Policy T-4.2, the allowance is $62.", "T-4.2")
    assert cites_clause("根据政策T-4.2,国内出差每日餐费补贴为 $62。", "T-4.2")
    assert cites_clause("(see t-4.2).", "T-4.2")
    assert not cites_clause("Under Policy T-4.21, ...", "T-4.2")
    assert not cites_clause("Under Policy T-4.2.1, ...", "T-4.2")
    assert not cites_clause("Under Policy ST-4.2, ...", "T-4.2")
    assert not cites_clause("Under Policy T-4.3, the allowance is $62.", "T-4.2")


def plan(ppl_merged: float | None, ppl_quantized: float | None) -> CheckPlan:
    cfg = ExportConfig()
    return CheckPlan(
        data="held-out", prompts=[], max_tokens=cfg.check_max_tokens,
        min_stop_rate=cfg.min_stop_rate, max_recall_drop=cfg.max_recall_drop,
        max_perplexity_ratio=cfg.max_perplexity_ratio, perplexity_merged=ppl_merged,
        perplexity_quantized=ppl_quantized, stop_tokens=Check(passed=True),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ppl_q", "recall_q", "passed"),
    [(1.05, 0.90, True), (1.2, 0.90, False), (1.05, 0.80, False), (1.10, 0.86, True)],
)
def test_quality_gate(ppl_q, recall_q, passed):
    gate = verdicts.quality_gate(plan(1.0, ppl_q), 0.90, recall_q)
    assert gate.passed is passed
    assert gate.perplexity_ratio == pytest.approx(ppl_q)


def test_quality_gate_without_reference_answers_judges_recall_only():
    gate = verdicts.quality_gate(plan(None, None), 0.9, 0.8)
    assert not gate.passed and gate.perplexity_ratio is None
    assert verdicts.quality_gate(plan(None, None), 0.9, 0.88).passed


def test_quality_gate_without_facts_judges_perplexity_only():
    gate = verdicts.quality_gate(plan(2.0, 2.1), None, None)
    assert gate.passed and gate.recall_drop_points is None


def test_eval_data_loading_and_errors(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(
        json.dumps({"id": "a", "question": "Q?", "fact": "$1", "answer": "A $1."})
        + "\n"
        + json.dumps({"question": ""})
        + "\n{bad\n"
        + json.dumps({"question": "Q?", "fact": 62})
        + "\n"
        + json.dumps({"question": "Q?", "answers": ["Paris", ""]})
        + "\n"
        + json.dumps({"question": "Q?", "fact": "$1", "clause": " "})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(TuneshipError) as info:
        probes.load_eval_items(path)
    assert f"{path}:line 2: 'question' must be a non-empty string" in str(info.value)
    assert f"{path}:line 3:" in str(info.value)
    assert f"{path}:line 4: 'fact' must be a string" in str(info.value)
    assert f"{path}:line 5: 'answers' must be a list of non-empty strings" in str(info.value)
    assert f"{path}:line 6: 'clause' must be a non-empty string" in str(info.value)
    path.write_text(json.dumps({"question": "Q?"}) + "\n")
    (item,) = probes.load_eval_items(path)
    assert item.messages == ({"role": "user", "content": "Q?"},) and item.fact is None
    assert item.clause is None and probes.cited(item, "T-4.2") is None
    path.write_text(json.dumps({"question": "Q?", "fact": "$62", "clause": "T-4.2"}) + "\n")
    (item,) = probes.load_eval_items(path)
    assert probes.cited(item, "Policy T-4.2: $62") and not probes.cited(item, "$62")


def test_missing_serve_environment_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNESHIP_SERVE_BIN", raising=False)
    with pytest.raises(TuneshipError, match="set checks=false to export without them"):
        probes.find_serve_bin(ExportConfig().serve_bin)


FAILING_PROBE = r"""#!/bin/sh
# `tuneship bundle probe` whose vLLM loaded the model, then died on the first request
out=$(echo "$@" | sed 's/.*--output \([^ ]*\).*/\1/')
log="${out%.json}.log"
worker="(Worker pid=3) ERROR 12-06 16:22:41 [multiproc_executor.py:1063]"
{
  echo "(APIServer pid=1) INFO 12-06 16:22:10 [model.py:733] Resolved architecture: Llama"
  echo "$worker Traceback (most recent call last):"
  echo "$worker   File \"x.py\", line 1, in f"
  echo "$worker AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
  echo "(APIServer pid=1) ERROR 12-06 [async_llm.py:906] EngineDeadError: EngineCore died."
} > "$log"
echo "urllib.error.HTTPError: HTTP Error 500: Internal Server Error" >&2
exit 1
"""


def test_a_failed_preflight_names_vllms_first_error_and_keeps_its_log(tmp_path):
    """The cause was in vLLM's log, which went with the partial bundle: the message was an
    HTTP 500 traceback. Now it names vLLM's first exception and the file that keeps the log."""
    serve_bin = tmp_path / "tuneship"
    serve_bin.write_text(FAILING_PROBE)
    serve_bin.chmod(0o755)
    work = tmp_path / "partial" / ".probe"
    request = probes.ProbeRequest(max_model_len=64, max_tokens=4)
    with pytest.raises(TuneshipError) as failed:
        probes.probe(serve_bin, tmp_path / "model", work, "quantized", request)
    first, kept = str(failed.value).splitlines()
    assert first == (
        f"vLLM could not serve {tmp_path / 'model'} (quantized): AttributeError: '_OpNamespace' "
        "'_C' object has no attribute 'cpu_gemm_wna16'"
    )
    kept_log = kept.removeprefix("vLLM's whole log: ")
    (tmp_path / "partial").rename(tmp_path / "gone")  # the partial bundle is removed
    assert "cpu_gemm_wna16" in Path(kept_log).read_text()
