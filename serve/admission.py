"""Admission: whether a request may start, decided before any byte of its response goes out.

vLLM 0.32 checks its queue bound (--max-num-queued-reqs) twice: in a preflight before the
response starts, and again when the request reaches the engine. Concurrent requests all pass
the preflight (none of them is counted yet), so under a burst the second check fails inside
the stream generator, after the 200 and the headers: the client sees a broken stream, with no
Retry-After, and the OpenAI SDK does not retry it. So tuneship counts the sequences in flight
itself, in the one process that sees every request, and refuses over the bound with a clean 503
(or 429 over a key's own limit) while it still can; vLLM's bound stays as a backstop set above
this one (see serve/run.py limit_args).
"""

from __future__ import annotations

import json
from collections import Counter

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
OVERLOAD, KEY_LIMIT, TOO_LARGE = "overload", "key_limit", "too_large"


def request_slots(path: str, body: bytes) -> int:
    """The sequences vLLM runs for a request (as its own admission counts them): n per prompt,
    a completions request may carry a list of prompts; 0 for routes that generate nothing."""
    if path not in GENERATION_PATHS:
        return 0
    try:
        data = json.loads(body)
    except ValueError:
        return 1  # vLLM answers 400; it still passes through the gate like any request
    if not isinstance(data, dict):
        return 1
    n = data.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    prompt = data.get("prompt") if path == "/v1/completions" else None
    # a list of strings or of token-id lists is a batch; a list of ints is one prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)
    return n


class Admission:
    """Sequences in flight, in all and per key, against the bounds (None: unbounded)."""

    def __init__(self, capacity: int | None, per_key: int | None = None):
        self.capacity = capacity
        self.per_key = per_key
        self.total = 0
        self.by_key: Counter[str] = Counter()

    @property
    def largest(self) -> int | None:
        """The most sequences one request may ask for."""
        bounds = [b for b in (self.capacity, self.per_key) if b is not None]
        return min(bounds) if bounds else None

    def admit(self, key: str, slots: int) -> str | None:
        """None when admitted (then release() it), else why not: too_large (can never fit),
        key_limit (the key's own bound is full) or overload (the server's is)."""
        if slots == 0:
            return None
        if self.largest is not None and slots > self.largest:
            return TOO_LARGE
        if self.per_key is not None and self.by_key[key] + slots > self.per_key:
            return KEY_LIMIT
        if self.capacity is not None and self.total + slots > self.capacity:
            return OVERLOAD
        self.total += slots
        self.by_key[key] += slots
        return None

    def release(self, key: str, slots: int) -> None:
        self.total -= slots
        self.by_key[key] -= slots
        if self.by_key[key] <= 0:
            del self.by_key[key]
