"""What tuneship adds inside vLLM's API server (loaded with vLLM's `--middleware` hook).

A pure ASGI middleware, so streamed responses pass through chunk by chunk. In the order a
request meets them:
- Routes (routes.py): an allowlist; any other path gets 404 before vLLM sees it. An OPTIONS
  request passes without a key only as a genuine CORS preflight.
- Probes: /health is vLLM's liveness; /ready is readiness: 200 once the engine serves and the
  start-up self-test passed (SIGUSR2 from `tuneship serve`, see selftest.py), 503 while
  draining.
- API keys (keys.py): every allowlisted route but the probes needs one when keys are configured
  (/metrics only with metrics_auth; websockets too). Failures get 401 in OpenAI's error shape.
- Draining: SIGUSR1 (sent by `tuneship serve` on SIGTERM) makes new API requests get 503 with
  Retry-After while in-flight ones finish; /tuneship/inflight (loopback only) reports how many.
- The body is read whole, up to max_request_bytes (413 past it), then handed to vLLM as sent.
- Admission (admission.py): over max_running + max_waiting sequences, 503 + Retry-After before
  the response starts (streams too); vLLM's own 503 gets Retry-After as well.
- Metrics (metrics.py) in vLLM's Prometheus registry: bundle info, requests and tokens per key
  id, auth failures, rejections, in-flight requests.
- One JSON log line per request (exchange.py): request id, key id, status, tokens, latency;
  prompts and replies only with log_prompts.

vLLM constructs the middleware with the app alone, so `tuneship serve` hands it its settings in
one piece: a MiddlewareSettings, JSON in the TUNESHIP_SERVE_SETTINGS variable.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import signal
import sys
from typing import Any

from pydantic import BaseModel, Field

from tuneship.config.schema import ServeConfig
from tuneship.infra.errors import TuneshipError

from .admission import KEY_LIMIT, TOO_LARGE, Admission, request_slots
from .asgi import BodyTooLarge, error_body, is_cors_preflight, read_body, respond, route_path
from .exchange import Exchange
from .keys import KeyRing
from .metrics import bundle_labels, metrics
from .routes import OPEN, access, refusal_for_dev_variables

SETTINGS_ENV = "TUNESHIP_SERVE_SETTINGS"
INFLIGHT_PATH = "/tuneship/inflight"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class MiddlewareSettings(BaseModel):
    """What the middleware is told: the serve settings and the bundle being served."""

    serve: ServeConfig
    bundle_dir: str | None = None
    self_test_token: str | None = Field(
        None,
        description="Set when `tuneship serve` runs its start-up self-test: /ready stays 503 "
        "until it passes (SIGUSR2), and its loopback requests carrying this token need no key.",
    )
    served_as: str | None = Field(
        None, description="How vLLM holds the weights here (weights.py), for /metrics."
    )

    def to_env(self) -> str:
        return self.model_dump_json(context={"reveal": True})

    @classmethod
    def from_env(cls) -> MiddlewareSettings:
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls(serve=ServeConfig())


NOT_FOUND = error_body(
    "Not Found: this server serves /v1/chat/completions, /v1/completions, /v1/models, "
    "/tokenize, /detokenize, /health, /ready and /metrics.",
    "not_found_error",
    None,
)


def _warn_about_keys(keys: KeyRing, cfg: ServeConfig) -> None:
    if not keys.configured:
        warning = (
            "no API keys configured (api_keys, api_keys_file): anyone who reaches this port "
            "can use the model"
        )
    elif keys.unnamed and cfg.key_id_secret is None:
        warning = (
            "no key_id_secret: the ids of unnamed keys in logs and metrics change at each start "
            "and differ between replicas; name the keys (name:key lines) or set "
            "TUNESHIP_KEY_ID_SECRET"
        )
    else:
        return
    print(f"warning: {warning}", file=sys.stderr, flush=True)


class TuneshipMiddleware:
    def __init__(self, app: Any, settings: MiddlewareSettings | None = None) -> None:
        self.app = app
        settings = settings or MiddlewareSettings.from_env()
        cfg = self.cfg = settings.serve
        refusal = refusal_for_dev_variables(os.environ, cfg)
        if refusal is not None:
            raise TuneshipError(refusal)  # vLLM was started by hand with this middleware
        self.m = metrics()
        labels = bundle_labels(settings.bundle_dir, settings.served_as)
        self.m["bundle"].labels(**labels).set(1)
        self.keys = KeyRing(
            cfg.key_list(),
            cfg.api_keys_file,
            id_secret=self._key_id_secret(cfg),
            on_error=lambda reason: self.m["keys_file_errors"].labels(reason=reason).inc(),
        )
        _warn_about_keys(self.keys, cfg)
        self.retry_after = str(cfg.retry_after)
        self.admission = Admission(cfg.capacity, cfg.max_per_key)
        self.draining = False
        self.self_test_token = settings.self_test_token
        self.verified = self.self_test_token is None
        self.inflight = 0
        # outside the main thread (a test harness) there is no drain signal
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGUSR1, self._start_draining)
            signal.signal(signal.SIGUSR2, self._self_test_passed)

    @staticmethod
    def _key_id_secret(cfg: ServeConfig) -> bytes:
        if cfg.key_id_secret is not None:
            return cfg.key_id_secret.get_secret_value().encode("utf-8")
        return os.urandom(32)  # ids stay unguessable; they just do not outlive the process

    def _start_draining(self, signum: int, frame: Any) -> None:
        self.draining = True

    def _self_test_passed(self, signum: int, frame: Any) -> None:
        self.verified = True

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
            await respond(send, 404, NOT_FOUND)
        elif allowed == OPEN:
            await self.app(scope, receive, send)
        else:
            await self._api_request(scope, receive, send)

    async def _websocket(self, scope: dict, receive: Any, send: Any) -> None:
        """Websockets need a key like any request; refused ones are closed before accepting
        (the client sees 403)."""
        exchange = Exchange(scope, self.cfg.log_prompts)
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
        state = "draining" if self.draining else "ready" if self.verified else "self-testing"
        await respond(
            send, 200 if state == "ready" else 503, json.dumps({"status": state}).encode()
        )

    async def _inflight_report(self, scope: dict, send: Any) -> None:
        """How many requests are in flight, for the supervisor's drain: it asks from the same
        machine, over loopback or to the address the server is bound to."""
        client = (scope.get("client") or ("",))[0]
        if client not in (*LOOPBACK, (scope.get("server") or ("",))[0]):
            await respond(send, 404, NOT_FOUND)
            return
        body = json.dumps({"inflight": self.inflight, "draining": self.draining}).encode()
        await respond(send, 200, body)

    async def _api_request(self, scope: dict, receive: Any, send: Any) -> None:
        """Authenticate, refuse while draining, admit (or refuse: overload), then pass
        through, observing the exchange."""
        exchange = Exchange(scope, self.cfg.log_prompts)
        refusal = None
        if self._is_self_test(scope):
            exchange.key_id = "self-test"
        elif self.keys.configured:
            refusal = self._authenticate(scope, exchange)
        if refusal is not None:
            await self._refuse_unauthenticated(send, exchange, refusal)
            return
        if self.draining:
            await self._refuse_draining(send, exchange)
            return
        try:
            body, receive = await read_body(scope, receive, self.cfg.max_request_bytes)
        except BodyTooLarge as exc:
            await self._refuse_too_large(send, exchange, exc.args[0])
            return
        if body is None:
            return  # the client left before it sent its request
        exchange.saw_request(body)
        slots = request_slots(route_path(scope), body)
        verdict = self.admission.admit(exchange.key_id, slots)
        if verdict is not None:
            await self._refuse_admission(send, exchange, verdict, slots)
            return
        try:
            await self._pass_through(scope, receive, send, exchange)
        finally:
            self.admission.release(exchange.key_id, slots)

    async def _refuse(
        self, send: Any, exchange: Exchange, status: int, body: bytes, headers: dict
    ) -> None:
        """Answer in place of vLLM (OpenAI's error shape), with the request id, and log it."""
        exchange.status = status
        await respond(send, status, body, headers | {"x-request-id": exchange.request_id})
        self._record(exchange)

    async def _refuse_unauthenticated(self, send: Any, exchange: Exchange, reason: str) -> None:
        self.m["auth_failures"].labels(reason=reason).inc()
        message = (
            "Missing API key: send it as 'Authorization: Bearer KEY'."
            if reason == "missing"
            else "Incorrect API key provided."
        )
        body = error_body(message, "invalid_request_error", "invalid_api_key")
        await self._refuse(send, exchange, 401, body, {"www-authenticate": "Bearer"})

    async def _refuse_draining(self, send: Any, exchange: Exchange) -> None:
        self.m["rejected"].labels(reason="draining").inc()
        body = error_body(
            "The server is shutting down; retry on another instance.", "server_error", "draining"
        )
        headers = {"retry-after": self.retry_after, "connection": "close"}
        await self._refuse(send, exchange, 503, body, headers)

    async def _refuse_too_large(self, send: Any, exchange: Exchange, size: int) -> None:
        body = error_body(
            f"The request body ({size} bytes or more) is over this server's limit of "
            f"{self.cfg.max_request_bytes} bytes (max_request_bytes).",
            "invalid_request_error", "request_too_large",
        )  # fmt: skip
        await self._refuse(send, exchange, 413, body, {"connection": "close"})

    async def _refuse_admission(
        self, send: Any, exchange: Exchange, verdict: str, slots: int
    ) -> None:
        """Refused before the response starts: a status the SDK retries (429 over the key's
        own bound, 503 over the server's), or 400 for a request that could never fit."""
        headers = {"retry-after": self.retry_after}
        if verdict == TOO_LARGE:
            status, headers = 400, {}
            body = error_body(
                f"This request needs {slots} sequences (n times the prompts); this server "
                f"runs at most {self.admission.largest} for one request. Lower n or send "
                "fewer prompts.",
                "invalid_request_error", "too_many_sequences", param="n",
            )  # fmt: skip
        elif verdict == KEY_LIMIT:
            status = 429
            body = error_body(
                f"Rate limit reached for this key: at most {self.admission.per_key} sequences "
                f"in flight at once; retry after {self.retry_after} s.",
                "requests", "rate_limit_exceeded",
            )  # fmt: skip
        else:
            status = 503
            body = error_body(
                f"The server is at capacity; retry after {self.retry_after} s.",
                "server_error", "overloaded",
            )  # fmt: skip
        if verdict != TOO_LARGE:
            self.m["rejected"].labels(reason=verdict).inc()
        await self._refuse(send, exchange, status, body, headers)

    async def _pass_through(self, scope: dict, receive: Any, send: Any, exchange: Exchange):
        async def observe_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": self._response_headers(message, exchange)}
            elif message["type"] == "http.response.body":
                exchange.saw_response_chunk(message.get("body", b""))
            await send(message)

        # vLLM leaves the request's exact usage in its state (see Exchange); the dict is the
        # one Starlette's request.state writes to, shared with every copy of the scope
        state = scope.setdefault("state", {})
        self.inflight += 1
        self.m["inflight"].inc()
        try:
            await self.app(scope, receive, observe_send)
        finally:
            self.inflight -= 1
            self.m["inflight"].dec()
            exchange.finish(state)
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

    def _is_self_test(self, scope: dict) -> bool:
        """A request of the start-up self-test: from loopback, with this run's token."""
        if self.self_test_token is None or self.verified:
            return False
        client = (scope.get("client") or ("",))[0]
        presented = dict(scope.get("headers") or []).get(b"x-tuneship-self-test", b"")
        token = self.self_test_token.encode()
        return client in LOOPBACK and hmac.compare_digest(presented, token)

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
        print(exchange.log_line(), flush=True)
