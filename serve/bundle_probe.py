"""`tuneship bundle probe MODEL_DIR --input IN.json --output OUT.json` (serve environment).

The export's preflight: starts vLLM's API server on a checkpoint with the production arguments of
`tuneship serve`, measures load time and peak memory, then records what vLLM does with the
export's probes: the token ids it feeds the model for chat messages (POST /tokenize) and greedy
chat replies with their finish_reason, length and latency. The export and `tuneship eval`
(train environment) judge the results.

IN.json is a tuneship.quality.probes.ProbeRequest, OUT.json a ProbeResult.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuneship.infra.engine_log import root_cause
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import write_json_atomic
from tuneship.infra.launch import Server, free_port
from tuneship.quality.probes import ProbeAnswer, ProbeChat, ProbeRequest, ProbeResult

from .run import build_command, vllm_flavour
from .weights import prepare as serving_weights

SERVED_NAME = "preflight"


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())


def run(model_dir: Path, input_path: Path, output_path: Path) -> ProbeResult:
    spec = ProbeRequest.model_validate_json(Path(input_path).read_text(encoding="utf-8"))
    result = ask(Path(model_dir), spec, Path(output_path).with_suffix(".log"))
    write_json_atomic(Path(output_path), result.model_dump(mode="json"))
    return result


def ask(model_dir: Path, spec: ProbeRequest, log: Path) -> ProbeResult:
    """Serve model_dir with the production arguments and ask it what spec asks."""
    flavour = vllm_flavour()
    port = free_port()
    weights = serving_weights(Path(model_dir), flavour)
    print(weights.line(), flush=True)
    served_name = spec.served_name or SERVED_NAME
    argv, env = build_command(
        weights,
        served_name,
        "127.0.0.1",
        port,
        flavour,
        spec.max_model_len,
        extra=tuple(spec.extra_args),
    )
    started = time.monotonic()
    with Server(argv, port, log, env=env) as server:
        load_s = time.monotonic() - started
        base = server.base_url

        def tokenize(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
            body = {"model": served_name, "messages": messages, "add_generation_prompt": True}
            return _post(f"{base}/tokenize", body | ({"tools": tools} if tools else {}))["tokens"]

        def chat(item: ProbeChat) -> ProbeAnswer:
            body = {
                "model": item.model or served_name,
                "messages": item.messages,
                "max_tokens": spec.max_tokens,
                "temperature": 0,
            } | ({"tools": item.tools} if item.tools else {})
            sent = time.monotonic()
            response = _post(f"{base}/v1/chat/completions", body)
            reply = response["choices"][0]
            calls = reply["message"].get("tool_calls") or []
            return ProbeAnswer(
                id=item.id,
                model=body["model"],
                text=reply["message"]["content"],
                finish_reason=reply["finish_reason"],
                completion_tokens=response.get("usage", {}).get("completion_tokens"),
                latency_s=round(time.monotonic() - sent, 3),
                tool_calls=[
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                    for c in calls
                ],
            )

        try:
            with ThreadPoolExecutor(spec.concurrency) as pool:
                tokens = list(pool.map(tokenize, spec.tokenize))
                tool_tokens = [tokenize(c.messages, c.tools) for c in spec.tool_tokenize]
                chat_started = time.monotonic()
                chats = list(pool.map(chat, spec.chats))
                chat_s = time.monotonic() - chat_started
        except OSError as exc:  # HTTP errors included: the server answered, then failed
            time.sleep(1)  # the engine's traceback reaches the log
            cause = root_cause(Path(log).read_text(errors="replace").splitlines())
            raise TuneshipError(
                f"vLLM loaded {model_dir} but failed a request ({exc}): "
                f"{cause or 'no exception in its log'}"
            ) from None
        peak = server.peak_rss_bytes()
    return ProbeResult(
        flavour=flavour,
        served_as=f"{weights.served_as} ({weights.why})",
        argv=argv[1:],
        load_s=round(load_s, 1),
        peak_rss_bytes=peak,
        chat_s=round(chat_s, 1),
        tokenize=tokens,
        tool_tokenize=tool_tokens,
        chats=chats,
    )
