"""The routes tuneship serves: an allowlist in front of vLLM's app.

vLLM 0.32 serves far more than an OpenAI endpoint needs: its API docs, `/load`, `/version`,
`/kv_event_sources`, `/scale_elastic_ep`, and with VLLM_SERVER_DEV_MODE or
VLLM_ALLOW_RUNTIME_LORA_UPDATING in the environment `/sleep`, `/collective_rpc`, weight
updates and adapter loading. Any key holder could reach them. Here only the routes users need
pass; every other path gets 404 before vLLM sees it.
"""

from __future__ import annotations

from collections.abc import Mapping

from tuneship.config.schema import ServeConfig

OPEN, KEY = "open", "key"
PROBES = ("/health", "/ready", "/ping")
API_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize")
METRICS = "/metrics"
DOCS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
DEV_VARIABLES = ("VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def access(path: str, cfg: ServeConfig) -> str | None:
    """OPEN (no key needed), KEY (a key needed when keys are configured) or None (404)."""
    if path in PROBES:
        return OPEN
    if path in API_ROUTES:
        return KEY
    if path == METRICS:
        return KEY if cfg.metrics_auth else OPEN
    if path in DOCS and cfg.api_docs:
        return OPEN  # a browser loads them and cannot send the key; they hold no data
    if cfg.vllm_dev_mode:
        return KEY  # the operator asked for every route vLLM serves
    return None


def dev_variables_set(environ: Mapping[str, str]) -> list[str]:
    """The variables that add vLLM's development routes, set to a value vLLM takes as on."""
    return [
        name
        for name in DEV_VARIABLES
        if environ.get(name, "").strip().lower() not in ("", "0", "false")
    ]


def refusal_for_dev_variables(environ: Mapping[str, str], cfg: ServeConfig) -> str | None:
    """Why serving must not start (a message naming the fix), or None."""
    found = dev_variables_set(environ)
    if not found or cfg.vllm_dev_mode:
        return None
    return (
        f"{', '.join(found)} is set: vLLM would then let any key holder sleep the engine, "
        "load adapters or run RPCs on it. Unset it, or set vllm_dev_mode: true "
        "(TUNESHIP_VLLM_DEV_MODE=true) to serve those routes on purpose."
    )
