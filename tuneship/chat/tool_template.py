"""How a base renders tool calls, and the vLLM tool parser that reads them back.

Found by rendering a probe conversation (a declared function, a call, its result, an answer),
not by a list of model names. A base whose own template renders all of it keeps its template,
and the parser is picked from the format it writes. A base whose template ignores tools but
uses ChatML turns (<|im_start|>/<|im_end|>, as the embedded default does) gets tuneship's tool
template: the widely used Hermes format (tools listed in the system turn, calls as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, results in `<tool_response>` inside a
user turn), read by vLLM's `hermes` parser; conversations without tools still render with the
base's own template, byte for byte. Training writes the template with the tokenizer into the
run, so the bundle and vLLM render what training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tuneship.chat.template import render
from tuneship.infra.errors import TuneshipError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BASE = "base"
TUNESHIP_CHATML = "tuneship-chatml-hermes"

# vLLM's --tool-strict-level: how much of a call its grammar holds the model to once the model
# starts one (text before it stays free). auto: only what tool_choice and each tool's `strict`
# ask; function: the call's markup and a declared function name; parameter: also arguments that
# fit the function's schema, as if every tool were `strict: true`.
ToolStrictLevel = Literal["auto", "function", "parameter"]
DEFAULT_TOOL_STRICT_LEVEL: ToolStrictLevel = "parameter"

_FUNCTION = "tuneship_probe_lookup"
_ARGUMENT = "tuneship-probe-argument"
_RESULT = "tuneship-probe-result"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _FUNCTION,
            "description": "Look a thing up.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
PROBE_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Look it up."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": _FUNCTION, "arguments": {"query": _ARGUMENT}},
            }
        ],
    },
    {"role": "tool", "content": _RESULT, "tool_call_id": "call_0"},
    {"role": "assistant", "content": "Done."},
]

# vLLM parser for the format a template writes, told by what it puts around a call
PARSERS = {"<tool_call>": "hermes"}

# Every tag strips the whitespace around it: the text is exactly what the string literals say.
_TOOLS_BRANCH = r"""
{%- if messages[0].role == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0].content -}}
{%- else -%}
  {{- '<|im_start|>system\nYou are a helpful assistant.' -}}
{%- endif -%}
{%- if tools -%}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' -}}
  {{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for m in messages -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- elif m.role == 'assistant' -%}
    {{- '<|im_start|>assistant' -}}
    {%- if m.content -%}{{- '\n' + m.content -}}{%- endif -%}
    {%- for call in (m.tool_calls or []) -%}
      {%- set f = call.function if call.function is defined else call -%}
      {%- set args = f.arguments if f.arguments is string else (f.arguments | tojson) -%}
      {{- '\n<tool_call>\n{"name": "' + f.name + '", "arguments": ' + args + '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
      {{- '<|im_start|>user' -}}
    {%- endif -%}
    {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
      {{- '<|im_end|>\n' -}}
    {%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


@dataclass(frozen=True)
class ToolFormat:
    template: str  # BASE (the base's own) or TUNESHIP_CHATML
    parser: str  # the vLLM tool parser that reads the calls this template teaches

    def describe(self) -> str:
        source = "the base's own chat template" if self.template == BASE else self.template
        return f"tool calls rendered by {source}, read by vLLM's '{self.parser}' parser"


def tool_arguments(
    parser: str | None, strict_level: ToolStrictLevel = DEFAULT_TOOL_STRICT_LEVEL
) -> list[str]:
    """vLLM's tool calling for a model trained to call tools: auto tool choice, the parser that
    reads the calls its template taught (bundle.json's serving.tool_parser) and how strictly a
    call is held to the declared functions. Without a parser, vLLM answers a request with tools
    and tool_choice auto with a 400."""
    if not parser:
        return []
    return [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        parser,
        "--tool-strict-level",
        strict_level,
    ]


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The probe conversation as the template renders it, when it renders the function, the
    call, its argument and the result; else None."""
    try:
        text = render(tokenizer, PROBE_MESSAGES, tools=PROBE_TOOLS)
    except Exception:  # a template that refuses tool turns: it does not render them
        return None
    return text if all(x in text for x in (_FUNCTION, _ARGUMENT, _RESULT)) else None


def uses_chatml(tokenizer: PreTrainedTokenizerBase) -> bool:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = render(tokenizer, messages)
    return "<|im_start|>user\nHi<|im_end|>" in text and "<|im_start|>assistant\nHello" in text


def tool_format(tokenizer: PreTrainedTokenizerBase) -> ToolFormat:
    """The format a run with tool calls trains in, and the parser that will read it."""
    rendered = renders_tools(tokenizer)
    if rendered is not None:
        parser = next((p for marker, p in PARSERS.items() if marker in rendered), None)
        if parser is None:
            raise TuneshipError(
                "the base's chat template renders tool calls in a format tuneship does not map "
                f"to a vLLM tool parser yet (it maps: {', '.join(PARSERS)}); train on data "
                "without tools, or use a base whose template writes <tool_call> (Qwen2.5, "
                "Qwen3, Hermes) or a ChatML one"
            )
        return ToolFormat(BASE, parser)
    if uses_chatml(tokenizer):
        return ToolFormat(TUNESHIP_CHATML, "hermes")
    raise TuneshipError(
        "the data has tool calls, but the base's chat template does not render tools and does "
        "not use ChatML turns, the one format tuneship ships a tool template for; train on data "
        "without tools, or use a base whose template renders them (Qwen2.5, Qwen3, Hermes)"
    )


def apply(tokenizer: PreTrainedTokenizerBase, fmt: ToolFormat) -> None:
    """Give the tokenizer the template fmt names (tuneship's wraps the base's own, which still
    renders every conversation without tools)."""
    if fmt.template != TUNESHIP_CHATML or _TOOLS_BRANCH in str(tokenizer.chat_template):
        return
    own = str(tokenizer.chat_template)
    tokenizer.chat_template = (
        "{%- set tuneship_ns = namespace(tools=false) -%}"
        "{%- for m in messages -%}{%- if m.role == 'tool' or m.tool_calls -%}"
        "{%- set tuneship_ns.tools = true -%}{%- endif -%}{%- endfor -%}"
        "{%- if tools or tuneship_ns.tools -%}" + _TOOLS_BRANCH + "{% else %}" + own + "{% endif %}"
    )
