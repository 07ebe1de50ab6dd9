"""The start-up self-test against a stand-in server (a real one: tests/test_serve_production.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneship.manifest import BundleManifest, Check, CheckPlan, CheckPrompt, header
from tuneship.serve.selftest import SELF_TEST_HEADER, SelfTest

TRAINED = {"a": [1, 5, 6, 7, 2, 9], "b": [1, 5, 8, 2, 9], "c": [1, 5, 4, 2, 9]}


def manifest(stopped: list[str] | None) -> BundleManifest:
    plan = CheckPlan(
        data="t", bos_token_id=1, max_tokens=8, min_stop_rate=0.5, max_recall_drop=5,
        max_perplexity_ratio=1.1, stop_tokens=Check(passed=True),
        prompts=[CheckPrompt(id=i, messages=[{"role": "user", "content": i}], trained_ids=ids)
                 for i, ids in TRAINED.items()],
    )  # fmt: skip
    checks = {"stop_tokens": Check(passed=True, stop_rate={"stopped_ids": stopped})}
    return BundleManifest(
        **header("tuneship.bundle", "b"), served_model_name="m",
        run={"name": "r", "path": "r"}, base={"ref": "d", "path": "d"}, merge={"into": "x"},
        quantization={"scheme": "W4A16"}, files={}, sizes={"model_bytes": 1},
        checks=checks if stopped is not None else {}, check_plan=plan,
        serving={"max_model_len": 64},
    )  # fmt: skip


@pytest.fixture
def server():
    """Answers /tokenize with the ids behind each prompt's generation prompt (training's ids up
    to the reply), and chats with the finish reason the test sets; records the headers."""
    state = {"ids": {k: v[:3] for k, v in TRAINED.items()}, "finish": "stop", "headers": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["headers"].append(self.headers.get(SELF_TEST_HEADER))
            prompt = body["messages"][0]["content"]
            if self.path == "/tokenize":
                reply = {"tokens": state["ids"][prompt]}
            else:
                reply = {"choices": [{"finish_reason": state["finish"]}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()


def test_passes_on_the_recorded_ids_and_stops_with_the_token(server):
    url, state = server
    result = SelfTest(manifest(["a", "c"]), url, "tok").run()
    assert result["passed"] and result["prompts"] == 2  # only prompts that stopped at check
    assert set(state["headers"]) == {"tok"}


def test_fails_naming_drifted_token_ids(server):
    url, state = server
    state["ids"]["a"] = [1, 5, 6, 3]  # the serving image renders the prompt differently
    result = SelfTest(manifest(["a", "b"]), url, "tok").run()
    assert not result["passed"] and "token ids differ from training's for ['a']" in result["reason"]


def test_fails_when_replies_no_longer_stop(server):
    url, state = server
    state["finish"] = "length"
    result = SelfTest(manifest(["a", "b", "c"]), url, "tok").run()
    assert not result["passed"] and "end-of-turn token is not honoured" in result["reason"]


def test_nothing_to_compare_without_a_vllm_check(server):
    url, _ = server
    assert SelfTest(manifest(None), url, "tok").run() == {
        "passed": True, "skipped": "no check through vLLM recorded prompts that stop"
    }  # fmt: skip
