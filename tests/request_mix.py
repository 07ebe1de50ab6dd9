"""The sampling parameters users send, through the official OpenAI SDK, one request at a time,
with the server's health checked after each: the host server (test_e2e.py) and the serve
container (test_containers.py) get the same mix, so the two cannot drift apart. A request that
kills vLLM's engine fails the test naming that request."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from openai import BadRequestError, OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}


def logprobs_top2_n2(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, logprobs=True, top_logprobs=2, n=2,
        temperature=0.8,
    )  # fmt: skip
    assert len(reply.choices) == 2
    for choice in reply.choices:
        tokens = choice.logprobs.content
        assert tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)


def seeded_sampling_repeats(client: OpenAI, model: str) -> None:
    def ask() -> str:
        return client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234,
        ).choices[0].message.content  # fmt: skip

    assert ask() == ask()


def stop_strings(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=48, temperature=0, stop=[" is", "."]
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert " is" not in choice.message.content and "." not in choice.message.content


def presence_and_frequency_penalties(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0.7, presence_penalty=1.5,
        frequency_penalty=1.0,
    )  # fmt: skip
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def vllm_extra_sampling(client: OpenAI, model: str) -> None:
    """vLLM's own parameters beside OpenAI's: top_k, min_p, repetition_penalty, min_tokens."""
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=12, temperature=0.9,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6},
    )  # fmt: skip
    assert reply.usage.completion_tokens >= 6


def json_schema_response(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=32, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )  # fmt: skip
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"city"} and answer["city"] in CITY["properties"]["city"]["enum"]


def max_tokens_at_the_limit(client: OpenAI, model: str) -> None:
    """max_tokens up to the context length is accepted (vLLM stops generating where the context
    ends; here a stop string ends it sooner), one past it is a 400."""
    context = next(m for m in client.models.list().data if m.id == model).max_model_len
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=context, temperature=0, stop=["\n"]
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    try:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=context + 1)
    except BadRequestError as exc:
        assert "max_tokens" in str(exc)
        return
    raise AssertionError("max_tokens one past the context length was accepted")


def stream_with_usage(client: OpenAI, model: str) -> None:
    """Every generated token streamed with its logprob, then a last chunk with the usage."""
    chunks = list(
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True, top_logprobs=1,
        )
    )  # fmt: skip
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert streamed[-1].finish_reason in ("stop", "length") and chunks[-1].usage is not None
    tokens = sum(len(c.logprobs.content) for c in streamed if c.logprobs)
    assert tokens == chunks[-1].usage.completion_tokens > 0


def n2_streamed(client: OpenAI, model: str) -> None:
    chunks = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0.8, n=2, stream=True
    )
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def completion_prompt_logprobs(client: OpenAI, model: str) -> None:
    """What lm-eval's loglikelihood tasks send."""
    reply = client.completions.create(
        model=model, prompt="The capital of France is Paris", max_tokens=1, echo=True, logprobs=2,
        temperature=0,
    )  # fmt: skip
    values = reply.choices[0].logprobs.token_logprobs
    assert values[0] is None and all(v <= 0 for v in values[1:]) and len(values) > 3


def logit_bias(client: OpenAI, model: str) -> None:
    """The greedy reply's first token, banned by logit_bias, is not its first token any more."""

    def first_token(**extra) -> str:
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=2, temperature=0, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True}, **extra,
        )  # fmt: skip
        return reply.choices[0].logprobs.content[0].token  # "token_id:123"

    greedy = first_token()
    banned = first_token(logit_bias={greedy.split(":")[1]: -100})
    assert banned != greedy


REQUESTS: dict[str, Callable[[OpenAI, str], None]] = {
    "logprobs with top_logprobs=2, n=2": logprobs_top2_n2,
    "seeded sampling (same seed, same reply)": seeded_sampling_repeats,
    "stop strings": stop_strings,
    "presence and frequency penalties": presence_and_frequency_penalties,
    "top_k, min_p, repetition_penalty, min_tokens": vllm_extra_sampling,
    "response_format json_schema": json_schema_response,
    "max_tokens at the context limit": max_tokens_at_the_limit,
    "streaming with include_usage and logprobs": stream_with_usage,
    "n=2 streamed": n2_streamed,
    "completion with echo and prompt logprobs": completion_prompt_logprobs,
    "logit_bias": logit_bias,
}


def send_the_request_mix(base_url: str, api_key: str = "unused") -> None:
    """Every request in REQUESTS; after each, /health must still answer 200."""
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    for name, request in REQUESTS.items():
        try:
            request(client, model)
        except Exception as exc:
            raise AssertionError(f"{name}: {exc.__class__.__name__}: {exc}") from exc
        assert healthy(base_url), f"the server is not healthy after the request {name!r}"
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8)
    assert reply.choices[0].message.content, "no answer after the request mix"


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
