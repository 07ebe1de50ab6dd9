"""tuneship's serving middleware on a stand-in ASGI app (vLLM itself: test_serve_production)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.support import fake_bundle, mount_secret
from tuneship.config.schema import ServeConfig
from tuneship.infra.errors import TuneshipError
from tuneship.serve.keys import KeyRing, key_id
from tuneship.serve.middleware import SETTINGS_ENV, MiddlewareSettings, TuneshipMiddleware

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class Usage:
    """vLLM's UsageInfo, as far as the middleware reads it."""

    def __init__(self, prompt_tokens: int, completion_tokens: int):
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens


class Metadata:
    """vLLM's RequestResponseMetadata, as far as the middleware reads it."""

    def __init__(self, usage: Usage | None = None):
        self.final_usage_info = usage


async def fake_vllm(scope, receive, send):
    """Answers like vLLM: JSON with usage, an SSE stream (?fake=stream; no usage recorded: a
    stream cut short), or 503 (?fake=busy)."""
    path, asked = scope["path"], scope.get("query_string", b"")
    if asked == b"fake=busy":
        status, ctype, chunks = 503, b"application/json", [b'{"error": {"message": "busy"}}']
    elif asked == b"fake=stream":
        status, ctype = 200, b"text/event-stream"
        chunks = [f'data: {{"choices": [{{"delta": {{"content": "t{i}"}}}}]}}\n\n'.encode()
                  for i in range(5)] + [b"data: [DONE]\n\n"]  # fmt: skip
    else:
        status, ctype = 200, b"application/json"
        chunks = [json.dumps({"ok": path, "usage": USAGE}).encode()]
        # where vLLM leaves the usage for middleware: request.state.request_metadata
        scope.setdefault("state", {})["request_metadata"] = Metadata(Usage(11, 7))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype)]})  # fmt: skip
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def call(app, method: str, path: str, key: str | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return await http.request(method, path, headers=headers)

    return asyncio.run(go())


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def middleware(**settings) -> TuneshipMiddleware:
    return TuneshipMiddleware(fake_vllm, MiddlewareSettings(serve=ServeConfig(**settings)))


@pytest.fixture
def keyed(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsk-file-1\n\n")
    app = middleware(api_keys="sk-env-1, sk-env-2", api_keys_file=str(keys))
    app.keys.recheck_s = 0
    return app, keys


def test_keys_from_env_and_file_and_openai_shaped_401(keyed, capsys):
    app, _ = keyed
    for key in ("sk-env-1", "sk-env-2", "sk-file-1"):
        assert call(app, "GET", "/v1/models", key).status_code == 200
    before = sample("tuneship_auth_failures_total", reason="invalid")
    for key, message in ((None, "Missing API key"), ("sk-nope", "Incorrect API key provided.")):
        reply = call(app, "GET", "/v1/models", key)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json() == {
            "error": {
                "message": reply.json()["error"]["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert message in reply.json()["error"]["message"]
        assert reply.headers["x-request-id"]  # on tuneship's own answers too
    assert sample("tuneship_auth_failures_total", reason="invalid") == before + 1
    out = capsys.readouterr().out
    assert "sk-env-1" not in out and "sk-nope" not in out and app.keys.id_of("sk-env-1") in out


def test_probes_are_open_and_metrics_follow_the_setting(keyed):
    app, _ = keyed
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/ready").json() == {"status": "ready"}
    assert call(app, "GET", "/metrics").status_code == 200
    guarded = middleware(api_keys="sk-env-1", metrics_auth=True)
    assert call(guarded, "GET", "/metrics").status_code == 401
    assert call(guarded, "GET", "/metrics", "sk-env-1").status_code == 200


def served_settings(monkeypatch, bundle, cfg: ServeConfig) -> MiddlewareSettings:
    """What `tuneship serve` hands the middleware, caught where it would start vLLM."""
    import tuneship.serve.run as serve_run

    seen: dict[str, str] = {}
    monkeypatch.setattr(serve_run.signal, "signal", lambda *a: None)  # pytest keeps its own
    monkeypatch.setattr(serve_run, "vllm_flavour", lambda: "cpu")
    monkeypatch.setattr(serve_run, "supervise", lambda argv, env, *a, **k: seen.update(env) or 0)
    assert serve_run.run(bundle, cfg) == 0
    return MiddlewareSettings.model_validate_json(seen[SETTINGS_ENV])


def test_a_kubelet_secret_update_rotates_the_keys_and_a_gap_keeps_the_last_good_ones(
    tmp_path, monkeypatch, capsys
):
    secret = mount_secret(tmp_path / "secret", {"api-keys": "sk-file-1\n"})
    cfg = ServeConfig(api_keys_file=str(secret / "api-keys"))
    app = TuneshipMiddleware(
        fake_vllm, served_settings(monkeypatch, fake_bundle(tmp_path / "b"), cfg)
    )
    app.keys.recheck_s = 0
    assert call(app, "GET", "/v1/models", "sk-file-1").status_code == 200
    mount_secret(secret, {"api-keys": "sk-file-2\n"})  # kubelet swaps ..data, deletes the old
    assert call(app, "GET", "/v1/models", "sk-file-2").status_code == 200
    assert call(app, "GET", "/v1/models", "sk-file-1").status_code == 401
    before = sample("tuneship_keys_file_errors_total", reason="missing")
    (secret / "..data").unlink()  # briefly missing
    assert call(app, "GET", "/v1/models", "sk-file-2").status_code == 200
    assert sample("tuneship_keys_file_errors_total", reason="missing") > before
    assert "warning: keys file" in capsys.readouterr().err
    (secret / "..data").symlink_to(tmp_path / "unreadable")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "api-keys").write_bytes(b"\xff\xfe not text")
    assert call(app, "GET", "/v1/models", "sk-file-2").status_code == 200
    assert sample("tuneship_keys_file_errors_total", reason="unreadable") >= 1
    (secret / "..data").unlink()
    mount_secret(secret, {"api-keys": "sk-file-3\n"})
    assert call(app, "GET", "/v1/models", "sk-file-3").status_code == 200
    assert call(app, "GET", "/v1/models", "sk-file-2").status_code == 401
    assert "keys file readable again" in capsys.readouterr().err


def test_serve_refuses_a_keys_file_it_cannot_read(tmp_path, monkeypatch):
    cfg = ServeConfig(api_keys_file=str(tmp_path / "nothing-here"))
    with pytest.raises(TuneshipError, match=r"api_keys_file .*nothing-here.* cannot be read"):
        served_settings(monkeypatch, fake_bundle(tmp_path / "b"), cfg)


def test_key_ring_compares_every_key():
    ring = KeyRing(["a-key", "b-key"], None, id_secret=b"s" * 32)
    assert ring.match("b-key") == key_id("b-key", b"s" * 32) and ring.match("c-key") is None


def test_tokens_and_requests_are_counted_per_key_and_logged_as_json(keyed, capsys):
    app, _ = keyed
    kid = app.keys.id_of("sk-env-2")
    before = sample("tuneship_tokens_total", key_id=kid, kind="completion")
    reply = call(app, "POST", "/v1/chat/completions", "sk-env-2")
    assert reply.json()["usage"] == USAGE and reply.headers["x-request-id"]
    streamed = call(app, "POST", "/v1/chat/completions?fake=stream", "sk-env-2")
    assert streamed.text.count("data:") == 6
    assert sample("tuneship_tokens_total", key_id=kid, kind="completion") == before + 7 + 5
    assert sample("tuneship_requests_total", key_id=kid, status="200") >= 2
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    last = lines[-2]
    assert last["key_id"] == kid and last["status"] == 200 and last["completion_tokens"] == 7
    assert last["prompt_tokens"] == 11 and last["latency_ms"] >= 0 and "request" not in last
    assert lines[-1]["stream"] is True and lines[-1]["completion_tokens"] == 5


def test_overload_503_gets_retry_after_and_is_counted(keyed):
    app, _ = keyed
    before = sample("tuneship_rejected_total", reason="overload")
    reply = call(app, "POST", "/v1/completions?fake=busy", "sk-env-1")
    assert reply.status_code == 503 and reply.headers["retry-after"] == "2"
    assert sample("tuneship_rejected_total", reason="overload") == before + 1


def test_sigusr1_drains_readiness_and_new_requests_but_not_liveness(keyed):
    app, _ = keyed
    os.kill(os.getpid(), signal.SIGUSR1)
    assert app.draining
    assert call(app, "GET", "/ready").status_code == 503
    assert call(app, "GET", "/health").status_code == 200
    refused = call(app, "POST", "/v1/chat/completions", "sk-env-1")
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "draining"


def test_inflight_count_is_only_told_to_loopback(keyed):
    app, _ = keyed
    assert call(app, "GET", "/tuneship/inflight").status_code == 404  # from 10.0.0.9


def test_no_keys_configured_warns(capsys):
    app = middleware()
    assert "warning: no API keys configured" in capsys.readouterr().err
    assert call(app, "GET", "/v1/models").status_code == 200


class SlowStreams:
    """A stand-in for vLLM's streaming chat: 200 and headers at once, then a few chunks, slowly;
    it records how many streams ran at the same time."""

    def __init__(self):
        self.now = self.peak = 0

    async def __call__(self, scope, receive, send):
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            for i in range(3):
                await asyncio.sleep(0.05)
                chunk = f'data: {{"choices": [{{"delta": {{"content": "t{i}"}}}}]}}\n\n'
                await send(
                    {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            self.now -= 1


def burst(app, bodies: list[dict], key: str | list[str] = "sk-a", path="/v1/chat/completions"):
    keys = key if isinstance(key, list) else [key] * len(bodies)

    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await asyncio.gather(*(
                http.post(path, json=body, headers={"Authorization": f"Bearer {k}"})
                for body, k in zip(bodies, keys, strict=True)
            ))  # fmt: skip

    return asyncio.run(go())


def test_a_burst_of_streams_beyond_the_bound_gets_503_before_any_stream_starts():
    vllm = SlowStreams()
    app = TuneshipMiddleware(
        vllm, MiddlewareSettings(serve=ServeConfig(api_keys="sk-a", max_running=1, max_waiting=1))
    )
    before = sample("tuneship_rejected_total", reason="overload")
    replies = burst(app, [{"model": "m", "stream": True, "messages": []}] * 6)
    streamed = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert len(streamed) == 2 and all(r.text.endswith("data: [DONE]\n\n") for r in streamed)
    assert vllm.peak == 2  # never more in flight than max_running + max_waiting
    assert len(refused) == 4
    for reply in refused:
        assert reply.status_code == 503 and reply.headers["retry-after"] == "2"
        assert reply.json()["error"]["code"] == "overloaded"
        assert reply.json()["error"]["type"] == "server_error"
    assert sample("tuneship_rejected_total", reason="overload") == before + 4
    # the slots are given back: a later request is admitted
    assert burst(app, [{"model": "m", "stream": True}])[0].status_code == 200


def test_a_request_takes_one_slot_per_sequence_it_asks_for():
    from tuneship.serve.admission import request_slots

    chat, completions = "/v1/chat/completions", "/v1/completions"
    assert request_slots(chat, b'{"n": 3, "messages": []}') == 3
    assert request_slots(completions, b'{"prompt": ["a", "b"], "n": 2}') == 4
    assert request_slots(completions, b'{"prompt": [1, 2, 3]}') == 1  # token ids: one prompt
    assert request_slots(completions, b'{"prompt": [[1], [2]]}') == 2
    assert request_slots(chat, b"{not json") == 1 and request_slots("/tokenize", b"{}") == 0
    vllm = SlowStreams()
    app = TuneshipMiddleware(
        vllm, MiddlewareSettings(serve=ServeConfig(api_keys="sk-a", max_running=2, max_waiting=1))
    )
    replies = burst(app, [{"stream": True, "n": 2}, {"stream": True, "n": 2}])
    assert sorted(r.status_code for r in replies) == [200, 503]
    too_many = burst(app, [{"stream": True, "n": 4}])[0]
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_options_needs_a_key_unless_it_is_a_genuine_cors_preflight():
    app = middleware(api_keys="sk-a", metrics_auth=True)

    def options(path: str, **headers: str) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                return await http.request("OPTIONS", path, headers=headers)

        return asyncio.run(go())

    assert options("/metrics").status_code == 401
    assert options("/metrics", Origin="https://a.example").status_code == 401
    assert options("/metrics", **{"Access-Control-Request-Method": "GET"}).status_code == 401
    preflight = options(
        "/v1/chat/completions", Origin="https://a.example",
        **{"Access-Control-Request-Method": "POST"},
    )  # fmt: skip
    assert preflight.status_code == 200  # vLLM's CORS middleware answers it


def websocket(app, headers: list[tuple[bytes, bytes]]) -> list[dict]:
    """Open a websocket through the middleware; what it sent back."""
    sent: list[dict] = []
    incoming = [{"type": "websocket.disconnect", "code": 1000}, {"type": "websocket.connect"}]

    async def receive():
        return incoming.pop()

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "root_path": "", "headers": headers,
             "client": ("10.0.0.9", 1), "server": ("t", 80), "query_string": b""}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_websocket_without_a_key_is_refused_before_the_app_sees_it():
    seen = []

    async def realtime(scope, receive, send):
        seen.append(scope["type"])
        await receive()
        await send({"type": "websocket.accept"})

    app = TuneshipMiddleware(realtime, MiddlewareSettings(serve=ServeConfig(api_keys="sk-a")))
    before = sample("tuneship_auth_failures_total", reason="missing")
    sent = websocket(app, [])
    assert sent[0]["type"] == "websocket.close" and seen == []
    assert sample("tuneship_auth_failures_total", reason="missing") == before + 1


HIDDEN = ["/docs", "/openapi.json", "/redoc", "/load", "/version", "/kv_event_sources",
          "/scale_elastic_ep", "/collective_rpc", "/sleep", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/server_info", "/pause", "/v1/responses",
          "/v1/chat/completions/render", "/metrics/x", "/metricsx", "/v1/models/"]  # fmt: skip
SERVED = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"]


def test_only_the_allowlisted_routes_reach_vllm_and_the_docs_need_a_setting():
    app = middleware(api_keys="sk-a", metrics_auth=True)
    for path in HIDDEN:
        for method in ("GET", "POST"):
            reply = call(app, method, path, "sk-a")
            assert reply.status_code == 404, (method, path)
            assert reply.json()["error"]["type"] == "not_found_error"
    for path in SERVED:
        assert call(app, "POST", path, "sk-a").status_code == 200, path
        assert call(app, "POST", path).status_code == 401, path
    for path in ("/health", "/ready", "/ping"):
        assert call(app, "GET", path).status_code == 200, path
    assert call(app, "GET", "/metrics", "sk-a").status_code == 200
    documented = middleware(api_keys="sk-a", api_docs=True)
    for path in ("/docs", "/openapi.json"):
        assert call(documented, "GET", path).status_code == 200, path  # docs load in a browser
    assert call(documented, "GET", "/load", "sk-a").status_code == 404


def test_a_root_path_is_taken_off_before_the_allowlist():
    app = middleware(api_keys="sk-a")

    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1), root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            h = {"Authorization": "Bearer sk-a"}
            return [await http.get(p, headers=h) for p in ("/api/v1/models", "/api/load")]

    assert [r.status_code for r in asyncio.run(go())] == [200, 404]


@pytest.mark.parametrize(
    ("name", "value"),
    [("VLLM_SERVER_DEV_MODE", "1"), ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")],
)
def test_serve_refuses_vllm_dev_variables_unless_a_setting_allows_them(
    tmp_path, monkeypatch, name, value
):
    bundle = fake_bundle(tmp_path / "b")
    monkeypatch.setenv(name, value)
    with pytest.raises(TuneshipError, match=f"{name} is set"):
        served_settings(monkeypatch, bundle, ServeConfig(api_keys="sk-a"))
    settings = served_settings(
        monkeypatch, bundle, ServeConfig(api_keys="sk-a", vllm_dev_mode=True)
    )
    app = TuneshipMiddleware(fake_vllm, settings)
    assert call(app, "POST", "/sleep", "sk-a").status_code == 200  # the operator asked for it
    assert call(app, "POST", "/sleep").status_code == 401
    monkeypatch.setenv(name, "0")
    served_settings(monkeypatch, bundle, ServeConfig(api_keys="sk-a"))  # off: nothing to refuse


def request(app, method: str, path: str, headers: dict | None = None, content=None):
    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.request(method, path, headers=headers or {}, content=content)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"\xff\xfe-not-utf8", False), (b"a" * 129, False), (b"a b", False), (b"x\r", False),
     (b"req-42_a.b:c", True), (b"A" * 128, True)],
)  # fmt: skip
def test_a_request_id_is_kept_only_when_short_and_plain(sent, kept):
    app = middleware(api_keys="sk-a")
    reply = request(
        app, "GET", "/v1/models", {"Authorization": "Bearer sk-a", "X-Request-Id": sent}
    )
    assert reply.status_code == 200
    echoed = reply.headers["x-request-id"].encode()
    assert (echoed == sent) is kept and len(echoed) <= 128
    assert re.fullmatch(rb"[A-Za-z0-9._:-]+", echoed)


def test_an_oversized_body_gets_413_in_openai_shape_declared_or_chunked():
    seen = []

    async def app_(scope, receive, send):
        seen.append(scope["path"])
        await fake_vllm(scope, receive, send)

    app = TuneshipMiddleware(app_, MiddlewareSettings(serve=ServeConfig(api_keys="sk-a")))
    headers = {"Authorization": "Bearer sk-a", "Content-Type": "application/json"}
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (16 << 20) + b'"}]}'
    declared = request(app, "POST", "/v1/chat/completions", headers, big)

    async def pieces():
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    chunked = request(app, "POST", "/v1/chat/completions", headers, pieces())
    for reply in (declared, chunked):
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "request_too_large"
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert seen == []
    small = middleware(api_keys="sk-a", max_request_bytes=1024)
    assert (
        request(small, "POST", "/v1/completions", headers, b"{}" + b" " * 1100).status_code == 413
    )
    assert request(small, "POST", "/v1/completions", headers, b"{}").status_code == 200


def test_only_what_is_logged_of_a_prompt_is_kept(monkeypatch, capsys):
    from tuneship.serve import middleware as mw

    kept = []
    log_line = mw.Exchange.log_line
    monkeypatch.setattr(
        mw.Exchange, "log_line", lambda self, *a: kept.append(self) or log_line(self, *a)
    )
    app = middleware(api_keys="sk-a", log_prompts=True)

    async def pieces():
        for _ in range(8):
            yield b"y" * (256 << 10)

    headers = {"Authorization": "Bearer sk-a"}
    assert request(app, "POST", "/v1/completions", headers, pieces()).status_code == 200
    logged = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert logged["request"] == "y" * 4000
    assert len(kept[0].request_body) <= 4000 and len(kept[0].body) <= 4000


def test_the_keys_file_parser_and_a_file_gone_between_stat_and_read(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("  # sk-commented\n\tsk-real  \n#sk-other\n")
    ring = KeyRing([], str(keys), id_secret=b"s" * 32)
    assert ring.match("sk-real") and ring.match("# sk-commented") is None
    assert ring.match("#sk-other") is None
    ring.recheck_s = 0
    keys.unlink()
    keys.mkdir()  # stat works, reading fails: what a file deleted between the two looks like
    app = TuneshipMiddleware(
        fake_vllm, MiddlewareSettings(serve=ServeConfig(api_keys_file=str(keys)))
    )
    app.keys = ring
    assert call(app, "GET", "/v1/models", "sk-real").status_code == 200


def test_one_key_flooding_gets_429_and_another_key_is_still_served():
    vllm = SlowStreams()
    cfg = ServeConfig(api_keys="sk-a, sk-b", max_running=2, max_waiting=2, max_per_key=2)
    app = TuneshipMiddleware(vllm, MiddlewareSettings(serve=cfg))
    before = sample("tuneship_rejected_total", reason="key_limit")
    keys = ["sk-a"] * 6 + ["sk-b"] * 2
    replies = burst(app, [{"stream": True}] * 8, keys)
    flood, other = replies[:6], replies[6:]
    assert [r.status_code for r in other] == [200, 200]  # the quiet key's share was kept free
    assert sorted(r.status_code for r in flood) == [200, 200, 429, 429, 429, 429]
    for reply in (r for r in flood if r.status_code == 429):
        assert reply.headers["retry-after"] == "2"
        assert reply.json()["error"]["code"] == "rate_limit_exceeded"
        assert reply.json()["error"]["type"] == "requests"
    assert sample("tuneship_rejected_total", reason="key_limit") == before + 4
    assert sample("tuneship_requests_total", key_id=app.keys.id_of("sk-a"), status="429") >= 4


def test_named_keys_are_known_by_name_and_unnamed_ones_by_a_keyed_hash(tmp_path, capsys):
    import hashlib

    keys = tmp_path / "keys"
    keys.write_text("alice:sk-alice-1\nalice:sk-alice-2\nsk-anon\n")
    ring = KeyRing(["ci:sk-ci"], str(keys), id_secret=b"s" * 32)
    assert ring.match("sk-alice-1") == ring.match("sk-alice-2") == "alice"  # rotation: one id
    assert ring.match("sk-ci") == "ci" and ring.match("alice:sk-alice-1") is None
    anon = ring.match("sk-anon")
    assert anon.startswith("k-") and len(anon) == 2 + 16
    # an open /metrics must not let anyone test guessed keys against the id offline
    assert hashlib.sha256(b"sk-anon").hexdigest()[:8] not in anon
    assert KeyRing(["sk-anon"], None, id_secret=b"t" * 32).match("sk-anon") != anon
    assert ring.id_of("sk-anon") == anon
    app = middleware(api_keys="sk-a")  # no key_id_secret: a random one, and a warning
    assert "key_id_secret" in capsys.readouterr().err
    assert app.keys.match("sk-a") != middleware(api_keys="sk-a").keys.match("sk-a")
    same = [middleware(api_keys="sk-a", key_id_secret="x" * 32).keys.match("sk-a") for _ in "ab"]
    assert same[0] == same[1]


async def vllm_reporting_usage(scope, receive, send):
    """Like vLLM 0.32's chat handler: a stream without a usage chunk (the client did not ask
    for one), or a non-streaming reply of 2 MiB; either way the exact usage is left for
    middleware in request.state.request_metadata.final_usage_info."""
    from starlette.requests import Request

    request = Request(scope, receive)
    request.state.request_metadata = metadata = Metadata()
    stream = json.loads(await request.body()).get("stream")
    ctype = b"text/event-stream" if stream else b"application/json"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
    )
    if stream:
        for i in range(3):  # chunks of 2-3 tokens each: a count of chunks is not a count of tokens
            event = json.dumps({"choices": [{"delta": {"content": f"w{i}"}}]})
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {event}\n\n".encode(),
                    "more_body": True,
                }
            )
        metadata.final_usage_info = Usage(23, 8)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        reply = {
            "choices": [{"message": {"content": "x" * (2 << 20)}}],
            "usage": {"prompt_tokens": 23, "completion_tokens": 900},
        }
        metadata.final_usage_info = Usage(23, 900)
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})


def test_tokens_per_key_are_exact_for_streams_without_usage_and_for_big_replies():
    app = TuneshipMiddleware(
        vllm_reporting_usage, MiddlewareSettings(serve=ServeConfig(api_keys="sk-u"))
    )
    kid = app.keys.id_of("sk-u")

    def counted() -> tuple[float, float]:
        return tuple(
            sample("tuneship_tokens_total", key_id=kid, kind=k) for k in ("prompt", "completion")
        )

    before = counted()
    streamed = burst(app, [{"stream": True}], "sk-u")[0]
    assert streamed.status_code == 200 and '"usage"' not in streamed.text  # none added for it
    after_stream = counted()
    assert (after_stream[0] - before[0], after_stream[1] - before[1]) == (23, 8)
    assert burst(app, [{"stream": False}], "sk-u")[0].status_code == 200
    after_big = counted()
    assert (after_big[0] - after_stream[0], after_big[1] - after_stream[1]) == (23, 900)


def test_ready_waits_for_the_self_test_whose_loopback_requests_need_no_key():
    app = TuneshipMiddleware(
        fake_vllm,
        MiddlewareSettings(serve=ServeConfig(api_keys="sk-1"), self_test_token="tok"),
    )
    assert call(app, "GET", "/ready").json() == {"status": "self-testing"}
    token = {"X-Tuneship-Self-Test": "tok"}
    assert call_from(app, "127.0.0.1", "/v1/models", token).status_code == 200
    assert call_from(app, "10.0.0.9", "/v1/models", token).status_code == 401  # not loopback
    assert (
        call_from(app, "127.0.0.1", "/v1/models", {"X-Tuneship-Self-Test": "x"}).status_code == 401
    )
    os.kill(os.getpid(), signal.SIGUSR2)  # what the supervisor sends when the self-test passed
    assert call(app, "GET", "/ready").json() == {"status": "ready"}
    assert call_from(app, "127.0.0.1", "/v1/models", token).status_code == 401  # spent


def call_from(app, client: str, path: str, headers: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=(client, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.get(path, headers=headers)

    return asyncio.run(go())
