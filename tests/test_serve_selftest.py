"""The start-up self-test against a stand-in server (a real one: tests/test_serve_production.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneship.handoff.manifest import BundleManifest, Check, CheckPlan, CheckPrompt, header
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
    state = {"ids": {k: v[:3] for k, v in TRAINED.items()}, "finish": "stop", "headers": [],
             "bodies": [], "top_logprobs": 2, "fail": set()}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["headers"].append(self.headers.get(SELF_TEST_HEADER))
            state["bodies"].append((self.path, body))
            if self.path == "/tokenize":
                reply = {"tokens": state["ids"][body["messages"][0]["content"]]}
            elif self.path == "/v1/completions":
                reply = {"choices": [{"logprobs": {"token_logprobs": [None, -1.5, -0.25]}}]}
            elif "n" in body:  # the sampling request
                top = [{"token": "a", "logprob": -1.0}] * state["top_logprobs"]
                tokens = {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": top}]}
                reply = {"choices": [{"index": i, "logprobs": tokens} for i in range(body["n"])]}
            else:
                reply = {"choices": [{"finish_reason": state["finish"]}]}
            if self.path in state["fail"]:
                self.send_response(500)
                self.end_headers()
                return
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
    assert result["sampling"] == [
        "chat with seed, penalties, n=2, logprobs", "completion with echo and prompt logprobs"
    ]  # fmt: skip
    sampled = next(body for path, body in state["bodies"] if "n" in body)
    assert sampled["messages"] == [{"role": "user", "content": "a"}]  # a check prompt's
    assert sampled["logprobs"] and sampled["seed"] is not None and sampled["n"] == 2


@pytest.mark.parametrize(
    ("broken", "named"),
    [("/v1/completions", "completion with echo and prompt logprobs: HTTPError: HTTP Error 500"),
     ("top_logprobs", "chat with seed, penalties, n=2, logprobs: choice 0 lacks its logprobs")],
)  # fmt: skip
def test_a_sampling_path_that_fails_fails_the_self_test_naming_it(server, broken, named):
    """The requests vLLM serves through other code than greedy chat (logprobs and their ranks,
    n > 1, seeds, prompt logprobs) must work before readiness: one that kills the engine
    (torch.compile with no C++ compiler in the image, once) would otherwise hit a user."""
    url, state = server
    if broken == "top_logprobs":
        state["top_logprobs"] = 1
    else:
        state["fail"].add(broken)
    result = SelfTest(manifest(["a"]), url, "tok").run()
    assert not result["passed"] and result["reason"].startswith(named)


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


def test_without_a_vllm_check_only_the_sampling_paths_are_tested(server):
    url, state = server
    result = SelfTest(manifest(None), url, "tok").run()
    assert result["passed"] and result["skipped"] == (
        "no check through vLLM recorded prompts that stop"
    )
    assert [path for path, _ in state["bodies"]] == ["/v1/chat/completions", "/v1/completions"]
