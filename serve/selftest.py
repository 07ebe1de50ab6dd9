"""The start-up self-test: readiness proves the bundle is served as it was checked.

Once vLLM answers, `tuneship serve` asks its own server a few of the prompts the bundle's checks
recorded: the token ids vLLM feeds the model must be the ones training used (template parity),
and greedy replies to prompts that stopped at check time must stop on the end-of-turn token
again. A serving image whose vLLM, tokenizer or chat template drifted from the one the bundle
was checked with fails here, before any traffic: the server stops with the reason, and /ready
never turns 200. It takes a few seconds.

The requests carry a one-time token (X-Tuneship-Self-Test) the middleware accepts from loopback
in place of an API key, so the self-test does not depend on the keys file.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass

from tuneship.checks import template_parity
from tuneship.manifest import BundleManifest, CheckPrompt

SELF_TEST_HEADER = "x-tuneship-self-test"
SAMPLES = 3


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
        if not prompts:
            return {"passed": True, "skipped": "no check through vLLM recorded prompts that stop"}
        plan = self.manifest.check_plan
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
            "seconds": round(time.monotonic() - started, 2),
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
