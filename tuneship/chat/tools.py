"""Tool calling in chat data: a record's declared functions, its assistant turns' calls and the
tool turns that answer them, normalised to OpenAI's shapes and validated.

- tools: `[{"type": "function", "function": {"name", "description", "parameters"}}]` (a bare
  `{"name", "description", "parameters"}` is accepted; ShareGPT datasets often hold the list as
  JSON text);
- a call: `{"id", "type": "function", "function": {"name", "arguments"}}` with the arguments
  kept as a JSON object (given as an object or as JSON text);
- a tool turn: `{"role": "tool", "content", "tool_call_id"}`.

A call must name a function the record declares, with arguments that are a JSON object fitting
the function's `parameters` schema (jsonschema); a tool turn must answer a call made before it
and not yet answered. Each failure raises ToolProblem, an InvalidRecord the data check counts
apart.
"""

from __future__ import annotations

import json
from typing import Any


class ToolProblem(ValueError):
    """A record's tools or calls are not valid (the message says which and why)."""


def parse_json_text(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ToolProblem(f"{what} is not valid JSON: {exc.msg} (column {exc.colno})") from None


def normalize_tools(value: Any) -> tuple[dict[str, Any], ...]:
    """A record's `tools` as OpenAI function tools; names unique."""
    value = parse_json_text(value, "'tools'")
    if value in (None, ""):
        return ()
    if not isinstance(value, list):
        raise ToolProblem(f"'tools' is a {type(value).__name__}, expected a list of functions")
    tools, names = [], set()
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolProblem(f"tools[{i}] is not a function with a 'name'")
        name = function["name"]
        if name in names:
            raise ToolProblem(f"tools[{i}]: function '{name}' is declared twice")
        names.add(name)
        parameters = parse_json_text(function.get("parameters"), f"tools[{i}].parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolProblem(f"tools[{i}].parameters is not a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolProblem(f"tools[{i}].description is not a string")
        # the function as vLLM hands it to the chat template (a missing description or
        # parameters as null), so that training renders the tools the server will
        spec = {"name": name, "description": description, "parameters": parameters}
        tools.append({"type": "function", "function": spec})
    return tuple(tools)


def normalize_call(call: Any, at: str, number: int) -> dict[str, Any]:
    """One call (OpenAI's {id, type, function: {name, arguments}}, or a bare {name, arguments}
    as ShareGPT's function_call turns hold it) with its arguments as an object."""
    call = parse_json_text(call, at)
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolProblem(f"{at} is not a call with a function 'name'")
    arguments = parse_json_text(function.get("arguments", {}), f"{at} arguments")
    if not isinstance(arguments, dict):
        raise ToolProblem(f"{at} arguments are a JSON {type(arguments).__name__}, not an object")
    call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
    return {
        "id": call_id or f"call_{number}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def check_call(call: dict[str, Any], tools: tuple[dict[str, Any], ...], at: str) -> None:
    """The call names a declared function, and its arguments fit that function's schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    name = call["function"]["name"]
    declared = {t["function"]["name"]: t["function"] for t in tools}
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise ToolProblem(f"{at} calls '{name}', which the record does not declare ({known})")
    schema = declared[name]["parameters"] or {"type": "object"}
    try:
        errors = sorted(
            Draft202012Validator(schema).iter_errors(call["function"]["arguments"]),
            key=lambda e: list(e.path),
        )
    except SchemaError as exc:
        raise ToolProblem(f"the parameters schema of '{name}' is invalid: {exc.message}") from None
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "arguments"
        raise ToolProblem(
            f"{at} arguments do not fit the schema of '{name}': {where}: {errors[0].message}"
        )


def calls_off_schema_order(conv_tools: tuple[dict[str, Any], ...], messages: Any) -> int:
    """How many of the calls write their arguments in another order than their function's
    schema lists its properties. Served with a strict level of `parameter`, vLLM's grammar
    writes arguments in the schema's order, so a model trained on another order is pushed off
    what it learnt at every such call."""
    order = {
        t["function"]["name"]: list(((t["function"]["parameters"] or {}).get("properties")) or {})
        for t in conv_tools
    }
    off = 0
    for message in messages:
        for call in message.get("tool_calls", ()):
            written = list(call["function"]["arguments"])
            listed = [k for k in order.get(call["function"]["name"], []) if k in written]
            off += [k for k in written if k in listed] != listed
    return off


class CallLedger:
    """Calls made and answered as a conversation's turns go by: a tool turn answers the oldest
    unanswered call (or the one its tool_call_id names)."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.calls = 0

    def made(self, calls: list[dict[str, Any]]) -> None:
        self.pending = list(calls)  # a new call turn: earlier unanswered calls are abandoned
        self.calls += len(calls)

    def answer(self, call_id: Any, at: str) -> str:
        """The id of the call a tool turn answers."""
        if not self.pending:
            raise ToolProblem(f"{at}: a tool result with no call before it left to answer")
        if call_id in (None, ""):
            return self.pending.pop(0)["id"]
        for i, call in enumerate(self.pending):
            if call["id"] == call_id:
                return self.pending.pop(i)["id"]
        waiting = ", ".join(c["id"] for c in self.pending)
        raise ToolProblem(f"{at}: tool_call_id '{call_id}' answers no pending call ({waiting})")
