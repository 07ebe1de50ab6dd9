"""Serving for production traffic, on vLLM (CPU) with the real OpenAI SDK: API keys (mounted and
rotated the way Kubernetes mounts a Secret), metrics behind a key, the route allowlist, bad
requests, a bounded queue under a burst of streams, client disconnects, SIGTERM draining."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import REPO, SERVE_BIN, mount_secret
from tuneship.infra.launch import Server, free_port

pytestmark = pytest.mark.e2e

ENV_KEY, FILE_KEY, ROTATED_KEY = "sk-env-0001", "sk-file-0002", "sk-file-0003"
ENV_KEY_ID = "e2e-client"  # its name: TUNESHIP_API_KEYS is name:key
RUNNING, WAITING = 2, 2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


KEYS_TEXT = f"# mounted from a Secret\n{FILE_KEY}\n"


def serve_argv(bundle: Path, port: int, keys_file: Path, *extra: str) -> list[str]:
    return [
        str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port),
        "--api-keys-file", str(keys_file), "--max-running", str(RUNNING),
        "--max-waiting", str(WAITING), "--metrics-auth", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    """The keys file as a Kubernetes Secret volume holds it: api-keys -> ..data/api-keys."""
    folder = mount_secret(tmp_path_factory.mktemp("secret"), {"api-keys": KEYS_TEXT})
    return folder / "api-keys"


@pytest.fixture(scope="module")
def server(bundle, keys_file):
    port = free_port()
    env = {"TUNESHIP_API_KEYS": f"{ENV_KEY_ID}:{ENV_KEY}"}
    log = bundle.parent / "serve-production.log"
    with Server(serve_argv(bundle, port, keys_file), port, log, env=env) as srv:
        yield srv


def client(server, key: str | None = ENV_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=key or "none", max_retries=0, timeout=120
    )


def authorized(key: str = ENV_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric_lines(server, prefix: str) -> list[str]:
    text = httpx.get(f"{server.base_url}/metrics", headers=authorized()).text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def gauge(server, series: str) -> float:
    """Sum of the samples of a metric name, or of a name with its first labels."""
    prefix = series if "{" in series else series + "{"
    return sum(float(line.split()[-1]) for line in metric_lines(server, prefix))


def test_keys_from_env_and_file_are_required_and_401s_are_openai_shaped(server):
    assert client(server, ENV_KEY).models.list().data[0].id == "e2e"
    assert client(server, FILE_KEY).models.list().data
    for key in ("sk-wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = httpx.get(f"{server.base_url}/v1/models", headers=headers)
        assert reply.status_code == 401
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key"
        assert ("sk-wrong" not in error["message"]) and ("Missing" in error["message"]) == (
            key is None
        )
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").chat.completions.create(model="e2e", messages=QUESTION)
    # probes stay open; /metrics needs a key (--metrics-auth)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{server.base_url}/metrics").status_code == 401
    assert httpx.get(f"{server.base_url}/metrics", headers=authorized()).status_code == 200
    # the keys never reach the log; their ids do
    log = server.log_path.read_text()
    assert FILE_KEY not in log and ENV_KEY not in log and '"key_id": "k-' in log


def wait_for_status(server, key: str, status: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        got = httpx.get(f"{server.base_url}/v1/models", headers=authorized(key)).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def test_a_kubelet_secret_update_rotates_the_keys_and_nothing_locks_out(server, keys_file):
    # kubelet's update: a new timestamped folder, ..data swapped, the old folder deleted
    mount_secret(keys_file.parent, {"api-keys": f"{ROTATED_KEY}\n"})
    try:
        assert wait_for_status(server, ROTATED_KEY, 200) == 200
        assert wait_for_status(server, FILE_KEY, 401) == 401
        assert httpx.get(f"{server.base_url}/ready").status_code == 200
    finally:
        mount_secret(keys_file.parent, {"api-keys": KEYS_TEXT})
    assert wait_for_status(server, FILE_KEY, 200) == 200  # and a second update works too
    assert wait_for_status(server, ROTATED_KEY, 401) == 401


def test_metrics_have_bundle_info_and_per_key_series(server):
    reply = client(server).chat.completions.create(
        model="e2e", messages=QUESTION, max_tokens=8, temperature=0
    )
    httpx.get(f"{server.base_url}/v1/models")  # one auth failure
    info = metric_lines(server, "tuneship_bundle_info{")
    assert len(info) == 1 and 'bundle="e2e"' in info[0] and 'quantization="W4A16"' in info[0]
    assert 'base_model="SmolLM2-135M-Instruct"' in info[0] and info[0].endswith(" 1.0")
    mine = ENV_KEY_ID
    requests = metric_lines(server, f'tuneship_requests_total{{key_id="{mine}",status="200"}}')
    assert requests and float(requests[0].split()[-1]) >= 2
    completion = gauge(server, f'tuneship_tokens_total{{key_id="{mine}",kind="completion"')
    assert completion >= reply.usage.completion_tokens > 0
    assert gauge(server, 'tuneship_auth_failures_total{reason="missing"') >= 1
    assert metric_lines(server, "vllm:num_requests_running")  # vLLM's own series are there too


def test_bad_requests_get_openai_shaped_errors_and_the_server_survives(server):
    headers = {"Authorization": f"Bearer {ENV_KEY}", "Content-Type": "application/json"}
    url = f"{server.base_url}/v1/chat/completions"
    cases = {
        "invalid JSON": ("{not json", 400),
        "wrong type": (json.dumps({"model": "e2e", "messages": QUESTION, "max_tokens": "x"}), 400),
        "prompt too long": (
            json.dumps({"model": "e2e", "messages": [{"role": "user", "content": "word " * 5000}]}),
            400,
        ),
        "max_tokens too large": (
            json.dumps({"model": "e2e", "messages": QUESTION, "max_tokens": 10**6}),
            400,
        ),
        "unknown model": (json.dumps({"model": "gpt-9", "messages": QUESTION}), 404),
    }
    for name, (body, status) in cases.items():
        reply = httpx.post(url, content=body, headers=headers, timeout=60)
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert {"message", "type", "code"} <= set(error), (name, error)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


LOAD_CLIENT = """
import json, sys, time, concurrent.futures as cf
import openai
base, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
def one(i):
    t0 = time.monotonic()
    try:
        r = client.chat.completions.create(
            model="e2e", messages=[{"role": "user", "content": f"Tell me about policy {i}."}],
            max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        return {"status": 200, "tokens": r.usage.completion_tokens, "s": time.monotonic() - t0}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "retry_after": e.response.headers.get("retry-after"),
                "error": e.response.json().get("error"), "s": time.monotonic() - t0}
with cf.ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(one, range(n)))))
"""


def test_load_beyond_the_queue_bound_is_refused_cleanly(server):
    sent = 4 * (RUNNING + WAITING)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_CLIENT, f"{server.base_url}/v1", ENV_KEY, str(sent)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    accepted = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] != 200]
    assert {r["status"] for r in rejected} <= {503}
    assert accepted and rejected, results
    assert all(r["tokens"] == 24 for r in accepted)  # every accepted request completed
    assert all(r["retry_after"] and r["error"]["message"] for r in rejected)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert gauge(server, 'tuneship_rejected_total{reason="overload"') >= len(rejected)
    latencies = sorted(r["s"] for r in accepted)
    figures = {
        "sent": sent,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "p50_s": round(latencies[len(latencies) // 2], 2),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
    }
    print(f"load test: {figures}")
    (server.log_path.parent / "load-test.json").write_text(json.dumps(figures))


STREAM_CLIENT = """
import json, sys, concurrent.futures as cf
import openai
base, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
def one(i):
    try:
        stream = client.chat.completions.create(
            model="e2e", messages=[{"role": "user", "content": f"Tell me about policy {i}."}],
            max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True})
    except openai.APIStatusError as e:
        return {"status": e.status_code, "retry_after": e.response.headers.get("retry-after"),
                "error": e.response.json().get("error")}
    finish, pieces = None, 0
    try:
        for chunk in stream:
            for choice in chunk.choices:
                pieces += 1
                finish = choice.finish_reason or finish
    except Exception as e:  # an error event inside the stream, after the 200
        return {"status": 200, "broken": f"{type(e).__name__}: {e}", "pieces": pieces}
    return {"status": 200, "finish": finish, "pieces": pieces}
with cf.ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(one, range(n)))))
"""


def test_a_burst_of_streams_gets_complete_streams_or_clean_503s(server):
    sent = 6 * (RUNNING + WAITING)
    before = gauge(server, 'tuneship_rejected_total{reason="overload"')
    done = subprocess.run(
        [sys.executable, "-c", STREAM_CLIENT, f"{server.base_url}/v1", ENV_KEY, str(sent)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    accepted = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] != 200]
    figures = {
        "sent": sent,
        "complete": sum(r.get("finish") == "length" for r in accepted),
        "broken": sum("broken" in r for r in accepted),
        "rejected_503": sum(r["status"] == 503 for r in rejected),
    }
    print(f"stream burst: {figures}")
    (server.log_path.parent / "stream-burst.json").write_text(json.dumps(figures))
    assert figures["broken"] == 0, [r for r in accepted if "broken" in r]
    assert all(r["finish"] == "length" for r in accepted), accepted
    assert len(accepted) >= RUNNING + WAITING and rejected, figures
    assert all(r["status"] == 503 and r["retry_after"] for r in rejected), rejected
    assert all(r["error"]["message"] and r["error"]["code"] for r in rejected), rejected
    after = gauge(server, 'tuneship_rejected_total{reason="overload"')
    assert after - before == len(rejected)


def raw_request(server, text: str) -> str:
    """Send text as is on a fresh connection and return the status line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(text.encode("latin-1"))
        return conn.recv(4096).decode("latin-1").split("\r\n")[0]


def test_options_and_websockets_are_not_side_doors(server):
    base = server.base_url
    plain = httpx.request("OPTIONS", f"{base}/metrics")
    assert plain.status_code == 401 and "vllm:" not in plain.text
    half = httpx.request("OPTIONS", f"{base}/metrics", headers={"Origin": "https://a.example"})
    assert half.status_code == 401 and "vllm:" not in half.text
    # a genuine preflight passes without a key: vLLM's CORS middleware answers it (400 here:
    # vLLM allows no origin by default) and no route runs
    preflight = httpx.request(
        "OPTIONS", f"{base}/metrics",
        headers={"Origin": "https://a.example", "Access-Control-Request-Method": "GET"},
    )  # fmt: skip
    assert preflight.status_code in (200, 400) and "vllm:" not in preflight.text
    assert "CORS" in preflight.text or not preflight.text
    upgrade = (
        "GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert " 101 " not in raw_request(server, upgrade)


def test_only_the_allowlisted_routes_answer_even_with_a_key(server):
    base, headers = server.base_url, authorized()
    for path in ("/docs", "/openapi.json", "/redoc", "/load", "/version", "/kv_event_sources",
                 "/server_info", "/is_sleeping", "/metrics/extra", "/v1/responses/x"):  # fmt: skip
        reply = httpx.get(f"{base}{path}", headers=headers)
        assert reply.status_code == 404, (path, reply.status_code, reply.text[:200])
        assert reply.json()["error"]["type"] == "not_found_error", path
    for path in ("/scale_elastic_ep", "/collective_rpc", "/sleep", "/v1/load_lora_adapter",
                 "/pause", "/start_profile", "/reset_prefix_cache"):  # fmt: skip
        reply = httpx.post(f"{base}{path}", headers=headers, json={})
        assert reply.status_code == 404, (path, reply.status_code, reply.text[:200])
    tokens = httpx.post(f"{base}/tokenize", headers=headers, json={"model": "e2e", "prompt": "hi"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    ids = tokens.json()["tokens"]
    text = httpx.post(f"{base}/detokenize", headers=headers, json={"model": "e2e", "tokens": ids})
    assert text.status_code == 200 and text.json()["prompt"] == "hi"


def test_an_oversized_body_gets_413_in_openai_shape(server):
    body = json.dumps({"model": "e2e", "messages": [{"role": "user", "content": "x" * (16 << 20)}]})
    headers = authorized() | {"Content-Type": "application/json"}
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", content=body, headers=headers,
                       timeout=60)  # fmt: skip
    assert reply.status_code == 413, reply.text[:300]
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}

    def chunked():
        yield body[: 1 << 20].encode()
        yield body[1 << 20 :].encode()

    reply = httpx.post(f"{server.base_url}/v1/chat/completions", content=chunked(),
                       headers=headers, timeout=60)  # fmt: skip
    assert reply.status_code == 413, reply.text[:300]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_a_stream_without_include_usage_counts_exact_tokens(server):
    mine = ENV_KEY_ID
    series = 'tuneship_tokens_total{{key_id="{}",kind="{}"'
    tokens = httpx.post(
        f"{server.base_url}/tokenize", headers=authorized(),
        json={"model": "e2e", "messages": QUESTION, "add_generation_prompt": True},
    ).json()["count"]  # fmt: skip
    before = {k: gauge(server, series.format(mine, k)) for k in ("prompt", "completion")}
    stream = client(server).chat.completions.create(
        model="e2e", messages=QUESTION, max_tokens=17, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices  # nothing added for it
    after = {k: gauge(server, series.format(mine, k)) for k in ("prompt", "completion")}
    assert after["prompt"] - before["prompt"] == tokens
    assert after["completion"] - before["completion"] == 17


def test_grafana_dashboard_queries_only_series_the_server_exports(server):
    dashboard = json.loads((REPO / "k8s" / "base" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"(tuneship_[a-z_]+|vllm:[a-z_]+)\{", target["expr"])
    }
    text = httpx.get(f"{server.base_url}/metrics", headers=authorized()).text
    exported = {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"}
    assert len(queried) >= 10 and queried <= exported, queried - exported


def test_a_client_that_disconnects_frees_its_slot(server):
    http = httpx.Client(timeout=60)
    body = {
        "model": "e2e", "messages": QUESTION, "max_tokens": 800, "stream": True,
        "ignore_eos": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {ENV_KEY}"}
    with http.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers
    ) as r:
        chunks = r.iter_lines()
        for _ in range(5):
            next(chunks)
        assert gauge(server, "vllm:num_requests_running") == 1
    http.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while gauge(server, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauge(server, "vllm:num_requests_running") == 0


def test_sigterm_drains_the_stream_refuses_new_requests_and_exits_0(bundle, keys_file):
    port = free_port()
    log = bundle.parent / "serve-drain.log"
    argv = serve_argv(bundle, port, keys_file, "--drain-timeout", "60")
    srv = Server(argv, port, log, env={"TUNESHIP_API_KEYS": f"{ENV_KEY_ID}:{ENV_KEY}"}).__enter__()
    probe = httpx.Client(timeout=10)  # made before the SIGTERM: the polls start at once
    try:
        assert probe.get(f"{srv.base_url}/ready").status_code == 200
        stream = client(srv).chat.completions.create(
            model="e2e", messages=QUESTION, max_tokens=200, stream=True, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces = [next(iter(stream))]
        sent = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)  # what Kubernetes does: PID 1 only
        refused = None
        polls = []  # (seconds after SIGTERM, /ready's status): a late drain or a slow poll
        deadline = time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                ready = probe.get(f"{srv.base_url}/ready")
            except httpx.ConnectError:
                pytest.fail(
                    f"the server stopped listening mid-stream; /ready polls {polls}:\n"
                    + srv.log_tail(60)
                )
            polls.append((round(time.monotonic() - sent, 2), ready.status_code))
            if ready.status_code == 503:
                refused = probe.get(
                    f"{srv.base_url}/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}
                )
            time.sleep(0.05)
        pieces += list(stream)
        finished = time.monotonic()
        code = srv.proc.wait(timeout=120)
        exited = time.monotonic()
    finally:
        probe.close()
        srv.stop()
    assert refused is not None and refused.status_code == 503, polls
    assert refused.json()["error"]["code"] == "draining" and refused.headers["retry-after"]
    assert pieces[-1].choices[0].finish_reason == "length"  # the stream ran to its end
    assert code == 0
    # vLLM shares the log and may leave a line unfinished: an event can start mid-line
    lines = [x[x.index('{"time"') :] for x in log.read_text().splitlines() if '{"time"' in x]
    events = [json.loads(x) for x in lines]
    assert [e["event"] for e in events if e["event"] in ("sigterm", "drained", "stopped")] == [
        "sigterm", "drained", "stopped",
    ]  # fmt: skip
    timings = {
        "stream_after_sigterm_s": round(finished - sent, 2),
        "exit_after_sigterm_s": round(exited - sent, 2),
        "first_503_after_sigterm_s": polls[-1][0],
    }
    print(f"drain: {timings}")
    (bundle.parent / "drain-test.json").write_text(json.dumps(timings))
