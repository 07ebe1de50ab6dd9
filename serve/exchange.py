"""One request as the middleware sees it: its id, key id, status, tokens and timing, for the
log line and the metrics."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from typing import Any

MAX_CAPTURED_BODY = 1 << 20
LOG_CHARS = 4000  # of a prompt and a reply, in the log line with log_prompts
# what a request id may be: short, plain text (it goes into logs and a response header)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(scope: dict) -> str:
    """The client's X-Request-Id when it is a short plain id, else a new one."""
    sent = dict(scope.get("headers") or []).get(b"x-request-id", b"")
    return sent.decode("ascii") if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


class Exchange:
    """What one request did, collected while it runs, for the log line and the metrics."""

    def __init__(self, scope: dict):
        self.request_id = request_id(scope)
        self.path = scope.get("path", "")
        self.method = scope.get("method", "")
        self.key_id = "-"
        self.status = 0
        self.stream = False
        self.body = bytearray()  # the reply, as much as the usage and the log need
        self.request_body = b""  # with log_prompts: the start of the request, as logged
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks = 0
        self.started = time.monotonic()

    def saw_request(self, body: bytes) -> None:
        self.request_body = body[:LOG_CHARS]

    def saw_response_chunk(self, chunk: bytes) -> None:
        if self.stream:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {"):
                    self._stream_event(line[6:])
        elif len(self.body) + len(chunk) <= MAX_CAPTURED_BODY:
            self.body += chunk

    def _stream_event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        self._usage(event.get("usage"))
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                self.chunks += 1  # vLLM streams about one token per content chunk

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)

    def finish(self) -> None:
        if not self.stream and self.body:
            with contextlib.suppress(ValueError, AttributeError):
                self._usage(json.loads(self.body).get("usage"))
        if self.stream and self.completion_tokens is None:
            self.completion_tokens = self.chunks  # no usage chunk was asked for

    def log_line(self, log_prompts: bool) -> str:
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
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if log_prompts:
            record["request"] = self.request_body[:LOG_CHARS].decode("utf-8", "replace")
            record["response"] = self.body[:LOG_CHARS].decode("utf-8", "replace")
        return json.dumps(record, ensure_ascii=False)
