"""One request as the middleware sees it: its id, key id, status, tokens and timing, for the
log line and the metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

LOG_CHARS = 4000  # of a prompt and a reply, in the log line with log_prompts
# what a request id may be: short, plain text (it goes into logs and a response header)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(scope: dict) -> str:
    """The client's X-Request-Id when it is a short plain id, else a new one."""
    sent = dict(scope.get("headers") or []).get(b"x-request-id", b"")
    return sent.decode("ascii") if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


class Exchange:
    """What one request did, collected while it runs, for the log line and the metrics.

    Tokens come from vLLM itself: its chat and completion handlers leave the request's final
    usage for middleware in request.state (`request_metadata.final_usage_info`, which Starlette
    keeps in scope["state"]), streamed or not, asked for by the client or not, whatever the
    size of the reply. Only when it is missing (a stream cut short by the client) are the
    stream's own usage chunk or its content chunks counted instead; `tokens_from` says which.
    """

    def __init__(self, scope: dict, capture: bool = False):
        self.request_id = request_id(scope)
        self.path = scope.get("path", "")
        self.method = scope.get("method", "")
        self.capture = capture  # log_prompts: keep the start of the request and the reply
        self.key_id = "-"
        self.status = 0
        self.stream = False
        self.request_body = b""
        self.body = b""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tokens_from: str | None = None
        self.chunks = 0
        self.started = time.monotonic()

    def saw_request(self, body: bytes) -> None:
        if self.capture:
            self.request_body = body[:LOG_CHARS]

    def saw_response_chunk(self, chunk: bytes) -> None:
        if self.capture and len(self.body) < LOG_CHARS:
            self.body += chunk[: LOG_CHARS - len(self.body)]
        if self.stream:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {"):
                    self._stream_event(line[6:])

    def _stream_event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        usage = event.get("usage")
        if isinstance(usage, dict) and not event.get("choices"):  # the final usage chunk
            self._count(usage.get("prompt_tokens"), usage.get("completion_tokens"), "usage_chunk")
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                self.chunks += 1  # vLLM streams about one token per content chunk

    def _count(self, prompt: Any, completion: Any, source: str) -> None:
        self.prompt_tokens, self.completion_tokens, self.tokens_from = prompt, completion, source

    def finish(self, state: dict) -> None:
        """After the response: the exact usage vLLM left in the request's state."""
        usage = getattr(state.get("request_metadata"), "final_usage_info", None)
        if usage is not None:
            self._count(usage.prompt_tokens, usage.completion_tokens, "vllm")
        elif self.stream and self.tokens_from is None:
            self._count(None, self.chunks, "chunk_count")

    def log_line(self) -> str:
        record = {
            "time": round(time.time(), 3),
            "event": "request",
            "request_id": self.request_id,
            "key_id": self.key_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_from": self.tokens_from,
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if self.capture:
            record["request"] = self.request_body.decode("utf-8", "replace")
            record["response"] = self.body.decode("utf-8", "replace")
        return json.dumps(record, ensure_ascii=False)
