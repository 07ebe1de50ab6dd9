"""Tool calling from the data to the serve command: records with tools and calls (OpenAI and
ShareGPT), validated (declared function, JSON, schema, answered results) and reported by data
check with file and line; rendered with the base's template where it renders tools, else
tuneship's ChatML/Hermes template (plain chats unchanged); call turns trained, tool results not;
run.json says how, and `tuneship serve` starts vLLM with the parser that reads them."""

from __future__ import annotations

import json
import subprocess

import pytest
from transformers import AutoTokenizer

from tests.support import (
    LLAMA3,
    SERVE_BIN,
    TUNESHIP,
    build_tokenizer,
    train_config,
    write_jsonl,
)
from tuneship.chat import tool_template
from tuneship.chat.labels import IGNORE, ChatTokenizer
from tuneship.chat.records import load_file
from tuneship.chat.template import render
from tuneship.handoff.manifest import read_run
from tuneship.infra.errors import TuneshipError
from tuneship.train.run import run

EXPENSE = {
    "type": "function",
    "function": {
        "name": "submit_expense",
        "description": "File an expense claim.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "currency": {"type": "string", "enum": ["EUR", "USD"]},
            },
            "required": ["amount", "currency"],
            "additionalProperties": False,
        },
    },
}
POLICY = {"name": "lookup_policy", "parameters": {"type": "object", "properties": {
    "section": {"type": "string"}}, "required": ["section"]}}  # fmt: skip


def call(name: str, arguments, call_id: str | None = "c1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def expense_chat(amount: int = 12, arguments=None) -> dict:
    arguments = (
        arguments if arguments is not None else json.dumps({"amount": amount, "currency": "EUR"})
    )
    calling = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("submit_expense", arguments)],
    }
    return {
        "tools": [EXPENSE],
        "messages": [
            {"role": "user", "content": f"File {amount} EUR for lunch."},
            calling,
            {"role": "tool", "tool_call_id": "c1", "content": '{"claim": 77}'},
            {"role": "assistant", "content": "Filed as claim 77."},
        ],
    }


def sharegpt_tool_chat() -> dict:
    return {
        "tools": json.dumps([POLICY, EXPENSE]),  # ShareGPT datasets hold them as JSON text
        "conversations": [
            {"from": "human", "value": "Travel rules, and file 5 USD?"},
            {"from": "function_call", "value": json.dumps([
                {"name": "lookup_policy", "arguments": {"section": "travel"}},
                {"name": "submit_expense", "arguments": {"amount": 5, "currency": "USD"}},
            ])},
            {"from": "observation", "value": "Travel: economy class."},
            {"from": "observation", "value": '{"claim": 78}'},
            {"from": "gpt", "value": "Economy class; filed as claim 78."},
        ],
    }  # fmt: skip


def test_openai_and_sharegpt_tool_records_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [expense_chat(), sharegpt_tool_chat()])
    result = load_file(path)
    assert not result.problems
    openai, sharegpt = result.conversations
    assert openai.tools == (EXPENSE,) and openai.calls == 1
    made = openai.messages[1]["tool_calls"][0]
    assert made["function"]["arguments"] == {"amount": 12, "currency": "EUR"}  # JSON text read
    assert openai.messages[2] == {"role": "tool", "content": '{"claim": 77}', "tool_call_id": "c1"}
    assert [t["function"]["name"] for t in sharegpt.tools] == ["lookup_policy", "submit_expense"]
    parallel = sharegpt.messages[1]["tool_calls"]
    assert [c["function"]["name"] for c in parallel] == ["lookup_policy", "submit_expense"]
    # results answer the calls in order when the data gives no ids
    assert [m["tool_call_id"] for m in sharegpt.messages[2:4]] == [c["id"] for c in parallel]


UNANSWERED = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
}
WRONG_ID = {
    **expense_chat(),
    "messages": [
        *expense_chat()["messages"][:2],
        {"role": "tool", "tool_call_id": "c9", "content": "x"},
    ],
}


@pytest.mark.parametrize(
    "record, reason",
    [
        ({**expense_chat(), "tools": []}, "calls 'submit_expense', which the record does not"),
        (expense_chat(arguments='{"amount": 12,'), "arguments is not valid JSON"),
        (expense_chat(arguments={"amount": 12}), "'currency' is a required property"),
        (expense_chat(arguments={"amount": 1, "currency": "GBP"}), "currency: 'GBP' is not one"),
        (expense_chat(arguments=[1]), "arguments are a JSON list, not an object"),
        (UNANSWERED, "a tool result with no call before it"),
        (WRONG_ID, "tool_call_id 'c9' answers no pending call (c1)"),
        ({**expense_chat(), "tools": [{"description": "no name"}]}, "tools[0] is not a function"),
    ],
)
def test_bad_tools_and_calls_are_named_by_file_and_line(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "t.jsonl", [expense_chat(), record])
    (problem,) = load_file(path).problems
    assert problem.where == "line 2" and problem.kind == "tool call", problem
    assert reason in problem.reason, problem.reason


def test_data_check_reports_tool_calls_and_the_format_training_will_use(tmp_path, tiny_base):
    bad = expense_chat(arguments={"amount": 3})
    path = write_jsonl(tmp_path / "t.jsonl", [expense_chat(), sharegpt_tool_chat(), bad])
    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(path), "--base", str(tiny_base), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 3  # an invalid record
    tools = json.loads(checked.stdout)["tools"]
    assert tools["conversations"] == 2 and tools["calls"] == 3 and tools["most_calls"] == 2
    assert tools["invalid_calls"] == 1
    assert "tuneship-chatml-hermes, read by vLLM's 'hermes' parser" in tools["format"]
    assert tools["off_schema_order"] == {"count": 0, "ids": []}


def test_data_check_names_calls_whose_arguments_the_strict_grammar_would_reorder(tmp_path):
    # at tool_strict_level parameter vLLM writes arguments in the schema's property order
    reordered = expense_chat(arguments='{"currency": "EUR", "amount": 12}')
    path = write_jsonl(tmp_path / "t.jsonl", [expense_chat(), reordered])
    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(path), "--no-tokens"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert "1 conversations write a call's arguments in another order than its schema's " in (
        checked.stdout
    )
    assert "(e.g. t.jsonl:2)" in checked.stdout


def test_tuneship_template_renders_tools_and_leaves_plain_chats_as_they_were():
    tokenizer = build_tokenizer()
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    before = render(tokenizer, plain)
    assert tool_template.renders_tools(tokenizer) is None  # the base's template ignores tools
    fmt = tool_template.tool_format(tokenizer)
    assert (fmt.template, fmt.parser) == (tool_template.TUNESHIP_CHATML, "hermes")
    tool_template.apply(tokenizer, fmt)
    assert render(tokenizer, plain) == before
    assert tool_template.renders_tools(tokenizer) is not None
    assert tool_template.tool_format(tokenizer).template == tool_template.BASE  # now it does


def test_call_turns_are_trained_and_tool_results_are_not(tmp_path):
    tokenizer = build_tokenizer()
    tool_template.apply(tokenizer, tool_template.tool_format(tokenizer))
    conv = load_file(write_jsonl(tmp_path / "t.jsonl", [expense_chat()])).conversations[0]
    example = ChatTokenizer(tokenizer)(conv)
    trained = tokenizer.decode([i for i, lab in zip(example.input_ids, example.labels,
                                                    strict=True) if lab != IGNORE])  # fmt: skip
    call_text = '<tool_call>\n{"name": "submit_expense", "arguments": {"amount": 12, '
    assert trained.startswith(call_text)
    assert '"currency": "EUR"}}\n</tool_call><|im_end|>Filed as claim 77.<|im_end|>' in trained
    assert 'claim": 77' not in trained and 'submit_expense", "description' not in trained


def test_a_base_that_renders_no_tools_and_is_not_chatml_is_refused():
    tokenizer = build_tokenizer(template=LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>")
    with pytest.raises(TuneshipError, match="does not render tools and does not use ChatML"):
        tool_template.tool_format(tokenizer)


def test_a_run_with_tool_calls_records_them_and_ships_the_template(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "t.jsonl", [expense_chat(i) for i in range(1, 9)] + [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ])  # fmt: skip
    out = run(train_config(tmp_path, tiny_base, data, max_steps=2))
    manifest = read_run(out)
    calling = manifest.tool_calling
    assert calling is not None
    assert (calling.template, calling.parser) == (tool_template.TUNESHIP_CHATML, "hermes")
    assert (calling.conversations, calling.calls) == (8, 8)
    shipped = AutoTokenizer.from_pretrained(out / "adapter")
    assert tool_template.renders_tools(shipped) is not None  # the bundle will render them too


def test_serve_starts_vllm_with_the_bundle_tool_parser():
    from tuneship.chat.tool_template import tool_arguments
    from tuneship.serve.run import tools_line

    assert tool_arguments("hermes") == ["--enable-auto-tool-choice", "--tool-call-parser",
                                        "hermes", "--tool-strict-level", "parameter"]  # fmt: skip
    assert tool_arguments("hermes", "auto")[-1] == "auto"
    assert tool_arguments(None) == []
    assert "gets a 400" in tools_line(None, "parameter")
    assert "tool_strict_level function" in tools_line("hermes", "function")


# What vLLM's grammar for `hermes` calls accepts, per --tool-strict-level (run in the serve
# environment, where vLLM and xgrammar are): {level: [accepted, ...]} for each text given.
STRICT_PROBE = """
import json, sys
from xgrammar import Grammar
from xgrammar.testing import _is_grammar_accept_string
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
from vllm.tool_parsers.structural_tag_registry import get_model_structural_tag
from vllm.tool_parsers.tool_strict_level import ToolStrictLevel
tools, texts = json.load(sys.stdin)
tools = [ChatCompletionToolsParam(**t) for t in tools]
accepted = {}
for level in ("function", "parameter"):
    tag = get_model_structural_tag(
        "hermes", tools, "auto", False, strict_level=ToolStrictLevel.from_name(level)
    )
    grammar = Grammar.from_structural_tag(tag.model_dump_json())
    accepted[level] = [_is_grammar_accept_string(grammar, t) for t in texts]
print(json.dumps(accepted))
"""


def test_the_calls_training_renders_are_what_the_strict_level_lets_vllm_generate():
    """At `tuneship serve`'s strict level, vLLM's grammar must accept the exact text the
    template trained (else it would force the model off it) and refuse calls of undeclared
    functions or off-schema arguments; `function` leaves the arguments free."""
    tokenizer = build_tokenizer()
    tool_template.apply(tokenizer, tool_template.tool_format(tokenizer))
    chat = expense_chat(arguments={"amount": 12.5, "currency": "EUR"})
    asked = render(tokenizer, chat["messages"][:1], add_generation_prompt=True, tools=chat["tools"])
    trained = render(tokenizer, chat["messages"][:2], tools=chat["tools"])[len(asked) :]
    trained = trained.removesuffix("<|im_end|>\n")
    texts = [
        trained,
        "I will file it. " + trained + " Done.",
        trained.replace("submit_expense", "file_expense"),
        trained.replace('"EUR"', '"GBP"'),
        "No call needed.",
    ]
    reply = subprocess.run(
        [str(SERVE_BIN.parent / "python"), "-c", STRICT_PROBE],
        input=json.dumps([chat["tools"], texts]),
        capture_output=True,
        text=True,
        check=True,
    )
    accepted = json.loads(reply.stdout.splitlines()[-1])
    assert trained.startswith('<tool_call>\n{"name": "submit_expense", "arguments": {')
    assert accepted["parameter"] == [True, True, False, False, True]
    assert accepted["function"] == [True, True, False, True, True]


# --- the tool check: tool prompts, how replies score, the gate ---------------------------------


def tool_prompt_rows() -> list[dict]:
    ask = {"role": "user", "content": "File 42.50 EUR for the taxi."}
    call = {"name": "submit_expense", "arguments": {"amount": 42.5, "currency": "EUR"}}
    made = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": call}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": '{"claim_id": "EXP-7"}'}
    return [
        {"id": "call", "messages": [ask], "tools": [EXPENSE], "call": call},
        {"id": "none", "question": "Hello?", "tools": [EXPENSE], "call": None, "fact": "Hello"},
        {"id": "after", "messages": [ask, made, result], "tools": [EXPENSE], "call": None,
         "fact": "EXP-7"},
    ]  # fmt: skip


def test_tool_prompts_load_with_their_kinds_and_bad_rows_are_named(tmp_path):
    from tuneship.infra.errors import ProblemsError
    from tuneship.quality.tool_calls import load_tool_items

    items = load_tool_items(write_jsonl(tmp_path / "t.jsonl", tool_prompt_rows()))
    assert [i.kind for i in items] == ["call", "no call", "answer after result"]
    assert items[2].wire_messages()[1]["tool_calls"][0]["function"]["arguments"] == (
        '{"amount": 42.5, "currency": "EUR"}'
    )  # JSON text on the wire, as the OpenAI API carries it
    bad = tool_prompt_rows()[0] | {"call": {"name": "submit_expense", "arguments": {"amount": 1}}}
    undeclared = tool_prompt_rows()[0] | {"call": {"name": "book_travel", "arguments": {}}}
    no_call_key = {k: v for k, v in tool_prompt_rows()[0].items() if k != "call"}
    path = write_jsonl(tmp_path / "bad.jsonl", [bad, undeclared, no_call_key])
    with pytest.raises(ProblemsError) as err:
        load_tool_items(path)
    text = str(err.value) + "\n".join(err.value.problems)
    assert "bad.jsonl:line 1" in text and "'currency' is a required property" in text
    assert "bad.jsonl:line 2" in text and "does not declare" in text
    assert "bad.jsonl:line 3" in text and "'call' is missing" in text


def test_replies_score_function_arguments_schema_and_unread_markup(tmp_path):
    from tuneship.quality.tool_calls import load_tool_items, score

    call, none, after = load_tool_items(write_jsonl(tmp_path / "t.jsonl", tool_prompt_rows()))
    right = score(call, [{"name": "submit_expense", "arguments": '{"amount": 42.50, '
                          '"currency": "EUR"}'}], None, "hermes")  # fmt: skip
    assert right.right and right.parsed and right.valid_json and right.schema_valid
    wrong_args = score(call, [{"name": "submit_expense", "arguments": '{"amount": 4.25, '
                               '"currency": "EUR"}'}], None, "hermes")  # fmt: skip
    assert wrong_args.right_function and not wrong_args.right and wrong_args.schema_valid
    off_schema = score(call, [{"name": "submit_expense", "arguments": '{"amount": "lots"}'}],
                       None, "hermes")  # fmt: skip
    assert off_schema.valid_json and not off_schema.schema_valid and not off_schema.right
    broken = score(call, [{"name": "submit_expense", "arguments": "{amount: 1"}], None, "hermes")
    assert broken.valid_json is False and broken.schema_valid is False
    unread = score(call, [], '<tool_call>\n{"name": "submit_expense"', "hermes")
    assert unread.attempted and not unread.parsed and unread.right is False
    assert score(none, [], "Hello there!", "hermes").no_call
    called = score(none, [{"name": "submit_expense", "arguments": "{}"}], None, "hermes")
    assert called.no_call is False and called.fact_said is False
    assert score(after, [], "Filed as EXP-7.", "hermes").fact_said
    assert score(after, [], "Filed.", "hermes").fact_said is False
    echoed = score(after, [], '<tool_response>\n{"claim_id": "EXP-7"}\n</tool_response>', "hermes")
    assert echoed.fact_said is False  # the raw result repeated is not an answer


def tool_plan(tmp_path, **thresholds):
    from tuneship.handoff.manifest import ToolCheckPlan, ToolCheckPrompt
    from tuneship.quality.tool_calls import load_tool_items

    items = load_tool_items(write_jsonl(tmp_path / "t.jsonl", tool_prompt_rows()))
    settings = {"min_parse_rate": 0.95, "min_right_calls": 0.0, "max_right_calls_drop": 10.0}
    return ToolCheckPlan(
        data="t.jsonl",
        parser="hermes",
        prompts=[ToolCheckPrompt.of(i, [1, 2, 3]) for i in items],
        **settings | thresholds,
    )


def answer(id_: str, text: str | None, calls: list[dict] | None = None):
    from tuneship.quality.probes import ProbeAnswer

    return ProbeAnswer(id=id_, model="m", text=text, finish_reason="stop", latency_s=0.1,
                       tool_calls=calls or [])  # fmt: skip


RIGHT = [{"name": "submit_expense", "arguments": '{"amount": 42.5, "currency": "EUR"}'}]


@pytest.mark.parametrize(
    ("first", "thresholds", "merged_right", "passed"),
    [
        (answer("call", None, RIGHT), {}, None, True),
        # the model wrote a call the parser could not read: refused whatever the other figures
        (answer("call", '<tool_call>\n{"name": "submit_expense", "arguments": {}}'), {}, None,
         False),
        (answer("call", "I cannot do that."), {"min_right_calls": 0.5}, None, False),
        (answer("call", "I cannot do that."), {}, [True], False),  # 100 points below the merged
        (answer("call", "I cannot do that."), {"max_right_calls_drop": 100}, [True], True),
    ],
)  # fmt: skip
def test_the_tool_check_refuses_unread_calls_and_wrong_calls(
    tmp_path, first, thresholds, merged_right, passed
):
    from tuneship.quality.verdicts import tool_check, tool_scores

    plan = tool_plan(tmp_path, **thresholds)
    plan.merged_right = merged_right
    chats = [first, answer("none", "Hello!"), answer("after", "EXP-7 is filed.")]
    check = tool_check(plan, tool_scores(plan, chats))
    assert check.passed is passed, check
    figures = check.figures()
    assert figures["parser"] == "hermes" and figures["no_call"] == 1.0
    if "<tool_call>" in (first.text or ""):
        assert figures["parse_rate"] == 0.0 and figures["unread_ids"] == ["call"]


def test_a_function_without_description_or_parameters_is_kept_as_vllm_renders_it():
    """vLLM hands the template a missing description or parameters as null; training renders
    the same (an empty description instead would put other tokens in every tool prompt)."""
    from tuneship.chat.tools import check_call, normalize_tools

    (tool,) = normalize_tools([{"name": "ping"}])
    function = {"name": "ping", "description": None, "parameters": None}
    assert tool == {"type": "function", "function": function}
    check_call({"function": {"name": "ping", "arguments": {"any": 1}}}, (tool,), "the call")


def test_export_tool_prompts_come_from_the_file_or_the_training_calls(tmp_path):
    from tuneship.config.schema import ExportConfig
    from tuneship.export.run import tool_check_prompts

    path = write_jsonl(tmp_path / "t.jsonl", tool_prompt_rows())
    given = tool_check_prompts(ExportConfig(tool_eval_data=str(path)), [], "hermes")
    assert [i.id for i in given.items] == ["call", "none", "after"] and given.parser == "hermes"
    trained = load_file(write_jsonl(tmp_path / "train.jsonl", [tool_prompt_rows()[2] | {
        "messages": [*tool_prompt_rows()[2]["messages"], {"role": "assistant", "content": "Ok."}]
    }])).conversations  # fmt: skip
    sampled = tool_check_prompts(ExportConfig(), trained, "hermes")
    (item,) = sampled.items
    assert item.call["name"] == "submit_expense" and [m["role"] for m in item.messages] == ["user"]
    assert tool_check_prompts(ExportConfig(), trained, None) is None  # no tools trained: no check
    with pytest.raises(TuneshipError, match="this run trained no tool calls"):
        tool_check_prompts(ExportConfig(tool_eval_data=str(path)), [], None)
