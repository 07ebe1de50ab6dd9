"""The start-up self-test: readiness proves the bundle is served as it was checked.

Once vLLM answers, `tuneship serve` asks its own server a few of the prompts the bundle's checks
recorded: the token ids vLLM feeds the model must be the ones training used (template parity),
and greedy replies to prompts that stopped at check time must stop on the end-of-turn token
again. A serving image whose vLLM, tokenizer or chat template drifted from the one the bundle
was checked with fails here, before any traffic: the server stops with the reason, and /ready
never turns 200. Then it sends the requests that take vLLM's other sampling paths (seeded
sampling with penalties, n > 1, logprobs with their ranks, prompt logprobs as evaluation
harnesses ask them): a path that needs something the image lacks (torch.compile once needed a
C++ compiler there) fails start-up rather than the first user who asks for it. It takes a few
seconds.

The requests carry a one-time token (X-Tuneship-Self-Test) the middleware accepts from loopback
in place of an API key, so the self-test does not depend on the keys file.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass

from tuneship.handoff.manifest import BundleManifest, CheckPrompt
from tuneship.quality.verdicts import template_parity

SELF_TEST_HEADER = "x-tuneship-self-test"
SAMPLES = 3
HELLO = [{"role": "user", "content": "Hello"}]
SAMPLED = {
    "max_tokens": 4, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.01, "seed": 7,
    "n": 2, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
    "logprobs": True, "top_logprobs": 2,
}  # fmt: skip
# what lm-eval's loglikelihood tasks send: the prompt's own logprobs, one token generated
PROMPT_LOGPROBS = {"prompt": "The capital of France is", "max_tokens": 1, "echo": True,
                   "logprobs": 1, "temperature": 0}  # fmt: skip


def _two_choices_with_top_logprobs(reply: dict) -> str | None:
    choices = reply["choices"]
    if len(choices) != SAMPLED["n"]:
        return f"{len(choices)} choices, not {SAMPLED['n']}"
    for choice in choices:
        tokens = (choice.get("logprobs") or {}).get("content") or []
        if not tokens or any(len(t["top_logprobs"]) != SAMPLED["top_logprobs"] for t in tokens):
            return f"choice {choice['index']} lacks its logprobs or top_logprobs"
    return None


def _prompt_logprobs(reply: dict) -> str | None:
    logprobs = reply["choices"][0].get("logprobs") or {}
    values = logprobs.get("token_logprobs") or []
    if len(values) < 2 or not all(isinstance(v, float) for v in values[1:]):
        return "no logprobs for the prompt's tokens"
    return None


@dataclass
class SelfTest:
    manifest: BundleManifest
    base_url: str
    token: str

    def prompts(self) -> list[CheckPrompt]:
        """The first few check prompts whose greedy reply stopped when the bundle was checked."""
        plan = self.manifest.check_plan
        if plan is None:
            return []
        stop = self.manifest.checks.get("stop_tokens")
        stopped = ((stop.figures().get("stop_rate") or {}) if stop else {}).get("stopped_ids")
        if stopped is None:  # not checked through vLLM (checks=off): nothing to compare with
            return []
        return [p for p in plan.prompts if p.id in set(stopped)][:SAMPLES]

    def run(self) -> dict:
        """What the self-test saw: passed, seconds, and the reason when it failed."""
        started = time.monotonic()
        prompts = self.prompts()
        if prompts:
            result = self._check_prompts(prompts)
        else:
            result = {"passed": True, "skipped": "no check through vLLM recorded prompts that stop"}
        if result["passed"]:
            result.update(self._check_sampling(prompts[0].messages if prompts else HELLO))
        result["seconds"] = round(time.monotonic() - started, 2)
        return result

    def _check_prompts(self, prompts: list[CheckPrompt]) -> dict:
        """Template parity and stopping, on prompts the bundle's checks recorded."""
        plan = self.manifest.check_plan
        assert plan is not None  # prompts() found some in it
        served = [self._post("/tokenize", self._tokenize_body(p))["tokens"] for p in prompts]
        parity = template_parity(prompts, served, plan.bos_token_id)
        finishes = [
            self._post("/v1/chat/completions", self._chat_body(p, plan.max_tokens))["choices"][0][
                "finish_reason"
            ]
            for p in prompts
        ]
        result = {
            "passed": bool(parity.passed) and all(f == "stop" for f in finishes),
            "prompts": len(prompts),
            "template_parity": bool(parity.passed),
            "finish_reasons": finishes,
        }
        if not parity.passed:
            result["reason"] = (
                f"vLLM's token ids differ from training's for {parity.figures()['mismatched_ids']}"
                " (the serving image's tokenizer or chat template changed)"
            )
        elif not result["passed"]:
            result["reason"] = (
                f"replies that stopped when the bundle was checked did not stop here "
                f"({finishes}): the end-of-turn token is not honoured"
            )
        return result

    def _check_sampling(self, messages: list[dict]) -> dict:
        """One request per sampling path vLLM has besides greedy decoding; each must answer in
        the shape OpenAI's API promises."""
        model = self.manifest.served_model_name
        checks = {
            "chat with seed, penalties, n=2, logprobs": (
                "/v1/chat/completions",
                {"model": model, "messages": messages, **SAMPLED},
                _two_choices_with_top_logprobs,
            ),
            "completion with echo and prompt logprobs": (
                "/v1/completions",
                {"model": model, **PROMPT_LOGPROBS},
                _prompt_logprobs,
            ),
        }
        for name, (path, body, problem_in) in checks.items():
            try:
                problem = problem_in(self._post(path, body))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            if problem:
                return {"passed": False, "sampling": name, "reason": f"{name}: {problem}"}
        return {"passed": True, "sampling": list(checks)}

    def _tokenize_body(self, prompt: CheckPrompt) -> dict:
        return {
            "model": self.manifest.served_model_name,
            "messages": prompt.messages,
            "add_generation_prompt": True,
        }

    def _chat_body(self, prompt: CheckPrompt, max_tokens: int) -> dict:
        return {
            "model": self.manifest.served_model_name,
            "messages": prompt.messages,
            "max_tokens": max_tokens,
            "temperature": 0,
        }

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", SELF_TEST_HEADER: self.token},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())
