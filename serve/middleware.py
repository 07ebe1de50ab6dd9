"""What tuneship adds inside vLLM's API server (loaded with vLLM's `--middleware` hook).

A pure ASGI middleware, so streamed responses pass through chunk by chunk:
- API keys (keys.py): several at once, from the api_keys setting and/or the api_keys_file (one
  per line, re-read every second through its links, the last good keys kept while it cannot be
  read); compared in constant time; never logged: each key is known by a short id. Every route
  except the probes needs a key when keys are configured; /metrics too with metrics_auth.
  Failures get 401 in OpenAI's error shape.
- Probes: /health is vLLM's liveness; /ready is readiness: 200 once the engine serves (this code
  only runs then) and 503 while draining.
- Draining: SIGUSR1 (sent by `tuneship serve` on SIGTERM) makes new API requests get 503 with
  Retry-After while in-flight ones finish; /tuneship/inflight (loopback only) reports how many.
- Overload: vLLM's own bounded queue (--max-num-queued-reqs) answers 503; Retry-After is added
  and the rejection counted.
- Metrics in vLLM's Prometheus registry: bundle info, requests and tokens per key id, auth
  failures, rejections, in-flight requests.
- One JSON log line per request: request id, key id, status, tokens, latency; prompts and
  replies only with log_prompts.

vLLM constructs the middleware with the app alone, so `tuneship serve` hands it its settings in
one piece: a MiddlewareSettings, JSON in the TUNESHIP_SERVE_SETTINGS variable.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tuneship.config import ServeConfig
from tuneship.errors import TuneshipError
from tuneship.manifest import read_bundle

from .admission import OVERLOAD, TOO_LARGE, Admission, request_slots
from .keys import KeyRing
from .routes import OPEN, access, refusal_for_dev_variables

SETTINGS_ENV = "TUNESHIP_SERVE_SETTINGS"
INFLIGHT_PATH = "/tuneship/inflight"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CAPTURED_BODY = 1 << 20


class MiddlewareSettings(BaseModel):
    """What the middleware is told: the serve settings and the bundle being served."""

    serve: ServeConfig
    bundle_dir: str | None = None

    def to_env(self) -> str:
        return self.model_dump_json(context={"reveal": True})

    @classmethod
    def from_env(cls) -> MiddlewareSettings:
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls(serve=ServeConfig())


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json.dumps(payload).encode("utf-8")


NOT_FOUND = error_body(
    "Not Found: this server serves /v1/chat/completions, /v1/completions, /v1/models, "
    "/tokenize, /detokenize, /health, /ready and /metrics.",
    "not_found_error",
    None,
)
_METRICS: dict[str, Any] = {}


def metrics() -> dict[str, Any]:
    """Created once per process, in the default registry vLLM's /metrics serves (also in its
    multiprocess mode: these classes then write to PROMETHEUS_MULTIPROC_DIR)."""
    if _METRICS:
        return _METRICS
    from prometheus_client import Counter, Gauge

    _METRICS.update(
        bundle=Gauge(
            "tuneship_bundle_info",
            "The bundle being served (value 1).",
            ["bundle", "base_model", "adapter_sha256", "quantization", "tuneship_version"],
            multiprocess_mode="max",
        ),
        requests=Counter(
            "tuneship_requests", "API requests by key id and status.", ["key_id", "status"]
        ),
        tokens=Counter(
            "tuneship_tokens", "Tokens by key id and kind (prompt, completion).", ["key_id", "kind"]
        ),
        keys_file_errors=Counter(
            "tuneship_keys_file_errors",
            "Failed reads of the keys file (missing, unreadable); the last good keys stay.",
            ["reason"],
        ),
        auth_failures=Counter(
            "tuneship_auth_failures", "Requests refused for a missing or wrong key.", ["reason"]
        ),
        rejected=Counter(
            "tuneship_rejected", "Requests refused with 503 (overload, draining).", ["reason"]
        ),
        inflight=Gauge(
            "tuneship_inflight_requests", "API requests in progress.", multiprocess_mode="livesum"
        ),
    )
    return _METRICS


def bundle_labels(bundle_dir: str | None) -> dict[str, str]:
    """Labels of tuneship_bundle_info, from the served bundle's bundle.json."""
    from tuneship import __version__

    labels = {
        "bundle": "unknown",
        "base_model": "unknown",
        "adapter_sha256": "",
        "quantization": "",
        "tuneship_version": __version__,
    }
    if bundle_dir is None:
        return labels
    try:
        manifest = read_bundle(Path(bundle_dir))
    except TuneshipError:
        return labels
    return labels | {
        "bundle": manifest.served_model_name,
        "base_model": Path(manifest.base.path or manifest.base.ref).name,
        "adapter_sha256": manifest.run.adapter.get("adapter_model.safetensors", "")[:16],
        "quantization": manifest.quantization.scheme,
    }


class Exchange:
    """What one request did, collected while it runs, for the log line and the metrics."""

    def __init__(self, scope: dict):
        headers = dict(scope.get("headers") or [])
        self.request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        self.path = scope.get("path", "")
        self.method = scope.get("method", "")
        self.key_id = "-"
        self.status = 0
        self.stream = False
        self.body = bytearray()
        self.request_body = bytearray()
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks = 0
        self.started = time.monotonic()

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
            record["request"] = self.request_body[:4000].decode("utf-8", "replace")
            record["response"] = self.body[:4000].decode("utf-8", "replace")
        return json.dumps(record, ensure_ascii=False)


class TuneshipMiddleware:
    def __init__(self, app: Any, settings: MiddlewareSettings | None = None) -> None:
        self.app = app
        settings = settings or MiddlewareSettings.from_env()
        cfg = self.cfg = settings.serve
        self.m = metrics()
        self.keys = KeyRing(
            cfg.key_list(),
            cfg.api_keys_file,
            on_error=lambda reason: self.m["keys_file_errors"].labels(reason=reason).inc(),
        )
        self.retry_after = str(cfg.retry_after)
        self.admission = Admission(cfg.capacity)
        self.draining = False
        self.inflight = 0
        self.m["bundle"].labels(**bundle_labels(settings.bundle_dir)).set(1)
        refusal = refusal_for_dev_variables(os.environ, cfg)
        if refusal is not None:
            raise TuneshipError(refusal)  # vLLM loaded the middleware by hand, not by serve
        if not self.keys.configured:
            print(
                "warning: no API keys configured (api_keys, api_keys_file): anyone who "
                "reaches this port can use the model",
                file=sys.stderr,
                flush=True,
            )
        # outside the main thread (a test harness) there is no drain signal
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGUSR1, self._start_draining)

    def _start_draining(self, signum: int, frame: Any) -> None:
        self.draining = True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or is_cors_preflight(scope):
            # lifespan; a CORS preflight is answered by vLLM's CORS middleware, no route runs
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        allowed = access(path, self.cfg)
        if path == "/ready":
            await self._readiness(send)
        elif path == INFLIGHT_PATH:
            await self._inflight_report(scope, send)
        elif allowed is None:
            await _respond(send, 404, NOT_FOUND)
        elif allowed == OPEN:
            await self.app(scope, receive, send)
        else:
            await self._api_request(scope, receive, send)

    async def _websocket(self, scope: dict, receive: Any, send: Any) -> None:
        """Websockets need a key like any request; refused ones are closed before accepting
        (the client sees 403)."""
        exchange = Exchange(scope)
        refusal = self._authenticate(scope, exchange) if self.keys.configured else None
        if refusal is None and access(route_path(scope), self.cfg) is not None:
            await self.app(scope, receive, send)
            return
        if refusal is not None:
            self.m["auth_failures"].labels(reason=refusal).inc()
        await receive()  # websocket.connect
        reason = "API key required" if refusal else "Not Found"
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        exchange.status = 403
        self._record(exchange)

    async def _readiness(self, send: Any) -> None:
        status = 503 if self.draining else 200
        body = json.dumps({"status": "draining" if self.draining else "ready"}).encode()
        await _respond(send, status, body)

    async def _inflight_report(self, scope: dict, send: Any) -> None:
        """How many requests are in flight, for the supervisor's drain: it asks from the same
        machine, over loopback or to the address the server is bound to."""
        client = (scope.get("client") or ("",))[0]
        if client not in (*LOOPBACK, (scope.get("server") or ("",))[0]):
            await _respond(send, 404, NOT_FOUND)
            return
        body = json.dumps({"inflight": self.inflight, "draining": self.draining}).encode()
        await _respond(send, 200, body)

    async def _api_request(self, scope: dict, receive: Any, send: Any) -> None:
        """Authenticate, refuse while draining, admit (or refuse: overload), then pass
        through, observing the exchange."""
        exchange = Exchange(scope)
        refusal = self._authenticate(scope, exchange) if self.keys.configured else None
        if refusal is not None:
            await self._refuse_unauthenticated(send, exchange, refusal)
            return
        if self.draining:
            await self._refuse_draining(send, exchange)
            return
        body, receive = await read_body(receive)
        if body is None:
            return  # the client left before it sent its request
        slots = request_slots(route_path(scope), body)
        verdict = self.admission.admit(exchange.key_id, slots)
        if verdict is not None:
            await self._refuse_admission(send, exchange, verdict, slots)
            return
        try:
            await self._pass_through(scope, receive, send, exchange)
        finally:
            self.admission.release(exchange.key_id, slots)

    async def _refuse_admission(
        self, send: Any, exchange: Exchange, verdict: str, slots: int
    ) -> None:
        """Refused before the response starts: a clean status the SDK retries (503), or 400
        for a request that could never fit."""
        if verdict == TOO_LARGE:
            status, headers = 400, {}
            body = error_body(
                f"This request needs {slots} sequences (n times the prompts); this server "
                f"runs at most {self.admission.capacity} at once. Lower n or send fewer prompts.",
                "invalid_request_error", "too_many_sequences", param="n",
            )  # fmt: skip
        else:
            status, headers = 503, {"retry-after": self.retry_after}
            body = error_body(
                f"The server is at capacity; retry after {self.retry_after} s.",
                "server_error", "overloaded",
            )  # fmt: skip
            self.m["rejected"].labels(reason=OVERLOAD).inc()
        exchange.status = status
        await _respond(send, status, body, headers)
        self._record(exchange)

    async def _refuse_unauthenticated(self, send: Any, exchange: Exchange, reason: str) -> None:
        self.m["auth_failures"].labels(reason=reason).inc()
        message = (
            "Missing API key: send it as 'Authorization: Bearer KEY'."
            if reason == "missing"
            else "Incorrect API key provided."
        )
        exchange.status = 401
        await _respond(
            send,
            401,
            error_body(message, "invalid_request_error", "invalid_api_key"),
            {"www-authenticate": "Bearer"},
        )
        self._record(exchange)

    async def _refuse_draining(self, send: Any, exchange: Exchange) -> None:
        self.m["rejected"].labels(reason="draining").inc()
        exchange.status = 503
        await _respond(
            send,
            503,
            error_body("The server is shutting down; retry on another instance.",
                       "server_error", "draining"),
            {"retry-after": self.retry_after, "connection": "close"},
        )  # fmt: skip
        self._record(exchange)

    async def _pass_through(self, scope: dict, receive: Any, send: Any, exchange: Exchange):
        async def capture_receive() -> dict:
            message = await receive()
            if self.cfg.log_prompts and message.get("type") == "http.request":
                exchange.request_body += message.get("body", b"")[:MAX_CAPTURED_BODY]
            return message

        async def observe_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": self._response_headers(message, exchange)}
            elif message["type"] == "http.response.body":
                exchange.saw_response_chunk(message.get("body", b""))
            await send(message)

        self.inflight += 1
        self.m["inflight"].inc()
        try:
            await self.app(scope, capture_receive, observe_send)
        finally:
            self.inflight -= 1
            self.m["inflight"].dec()
            exchange.finish()
            self._record(exchange)

    def _response_headers(self, start: dict, exchange: Exchange) -> list:
        """The request id on every response; Retry-After on vLLM's own 503 (its queue)."""
        exchange.status = start["status"]
        headers = list(start.get("headers") or [])
        content_type = dict(headers).get(b"content-type", b"")
        exchange.stream = content_type.startswith(b"text/event-stream")
        headers.append((b"x-request-id", exchange.request_id.encode()))
        if exchange.status == 503 and not any(k == b"retry-after" for k, _ in headers):
            headers.append((b"retry-after", self.retry_after.encode()))
            self.m["rejected"].labels(reason="overload").inc()
        return headers

    def _authenticate(self, scope: dict, exchange: Exchange) -> str | None:
        """None when a valid key was presented, else the reason: missing or invalid."""
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "missing"
        found = self.keys.match(presented.strip())
        if found is None:
            return "invalid"
        exchange.key_id = found
        return None

    def _record(self, exchange: Exchange) -> None:
        self.m["requests"].labels(key_id=exchange.key_id, status=str(exchange.status)).inc()
        for kind, count in (
            ("prompt", exchange.prompt_tokens),
            ("completion", exchange.completion_tokens),
        ):
            if count:
                self.m["tokens"].labels(key_id=exchange.key_id, kind=kind).inc(count)
        print(exchange.log_line(self.cfg.log_prompts), flush=True)


def is_cors_preflight(scope: dict) -> bool:
    """OPTIONS with both Origin and Access-Control-Request-Method, as a browser sends it;
    any other OPTIONS request is an ordinary request and needs a key."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {name.lower() for name, _ in scope.get("headers") or []}
    return {b"origin", b"access-control-request-method"} <= names


def route_path(scope: dict) -> str:
    """The path the router matches (as Starlette computes it: without the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


async def read_body(receive: Any) -> tuple[bytes | None, Any]:
    """The whole request body (None if the client left first) and a receive that hands it
    over again, then goes on to the client's own messages (vLLM watches those for a
    disconnect, to abort the generation)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return body, replay


async def _respond(send: Any, status: int, body: bytes, headers: dict | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
