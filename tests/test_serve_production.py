"""Serving for production traffic, on vLLM (CPU) with the real OpenAI SDK: API keys and rotation,
metrics, bad requests, a bounded queue under load, client disconnects, SIGTERM draining."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import REPO, SERVE_BIN
from tuneship.launch import Server, free_port

pytestmark = pytest.mark.e2e

ENV_KEY, FILE_KEY, ROTATED_KEY = "sk-env-0001", "sk-file-0002", "sk-file-0003"
RUNNING, WAITING = 2, 2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def serve_argv(bundle: Path, port: int, keys_file: Path, *extra: str) -> list[str]:
    return [
        str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port),
        "--api-keys-file", str(keys_file), "--max-running", str(RUNNING),
        "--max-waiting", str(WAITING), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# mounted from a Secret\n{FILE_KEY}\n")
    return path


@pytest.fixture(scope="module")
def server(bundle, keys_file):
    port = free_port()
    env = {"TUNESHIP_API_KEYS": ENV_KEY}
    log = bundle.parent / "serve-production.log"
    with Server(serve_argv(bundle, port, keys_file), port, log, env=env) as srv:
        yield srv


def client(server, key: str | None = ENV_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=key or "none", max_retries=0, timeout=120
    )


def metric_lines(server, prefix: str) -> list[str]:
    text = httpx.get(f"{server.base_url}/metrics").text
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
    # probes and (by default) metrics stay open
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200
    # the keys never reach the log; their ids do
    log = server.log_path.read_text()
    assert FILE_KEY not in log and ENV_KEY not in log and '"key_id": "k-' in log


def test_rotating_the_keys_file_takes_effect_without_a_restart(server, keys_file):
    keys_file.write_text(f"{ROTATED_KEY}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rotated = httpx.get(
            f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {ROTATED_KEY}"}
        )
        if rotated.status_code == 200:
            break
        time.sleep(0.3)
    assert rotated.status_code == 200
    old = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {FILE_KEY}"})
    assert old.status_code == 401
    keys_file.write_text(f"{FILE_KEY}\n")


def test_metrics_have_bundle_info_and_per_key_series(server):
    reply = client(server).chat.completions.create(
        model="e2e", messages=QUESTION, max_tokens=8, temperature=0
    )
    httpx.get(f"{server.base_url}/v1/models")  # one auth failure
    info = metric_lines(server, "tuneship_bundle_info{")
    assert len(info) == 1 and 'bundle="e2e"' in info[0] and 'quantization="W4A16"' in info[0]
    assert 'base_model="SmolLM2-135M-Instruct"' in info[0] and info[0].endswith(" 1.0")
    from tuneship.serve.middleware import key_id

    mine = key_id(ENV_KEY)
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


def test_grafana_dashboard_queries_only_series_the_server_exports(server):
    dashboard = json.loads((REPO / "k8s" / "base" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"(tuneship_[a-z_]+|vllm:[a-z_]+)\{", target["expr"])
    }
    text = httpx.get(f"{server.base_url}/metrics").text
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
    srv = Server(argv, port, log, env={"TUNESHIP_API_KEYS": ENV_KEY}).__enter__()
    try:
        stream = client(srv).chat.completions.create(
            model="e2e", messages=QUESTION, max_tokens=120, stream=True, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces = [next(iter(stream))]
        sent = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)  # what Kubernetes does: PID 1 only
        refused = None
        deadline = time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.base_url}/ready")
            except httpx.ConnectError:
                pytest.fail(f"the server stopped listening mid-stream:\n{srv.log_tail(60)}")
            if ready.status_code == 503:
                refused = httpx.get(
                    f"{srv.base_url}/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}
                )
            time.sleep(0.05)
        pieces += list(stream)
        finished = time.monotonic()
        code = srv.proc.wait(timeout=120)
        exited = time.monotonic()
    finally:
        srv.stop()
    assert refused is not None and refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining" and refused.headers["retry-after"]
    assert pieces[-1].choices[0].finish_reason == "length"  # the stream ran to its end
    assert code == 0
    events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith('{"time"')]
    assert [e["event"] for e in events if e["event"] in ("sigterm", "drained", "stopped")] == [
        "sigterm", "drained", "stopped",
    ]  # fmt: skip
    timings = {
        "stream_after_sigterm_s": round(finished - sent, 2),
        "exit_after_sigterm_s": round(exited - sent, 2),
    }
    print(f"drain: {timings}")
    (bundle.parent / "drain-test.json").write_text(json.dumps(timings))
