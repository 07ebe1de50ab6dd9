"""tuneship's series in vLLM's Prometheus registry, and the bundle's info labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneship.handoff.manifest import read_bundle
from tuneship.infra.errors import TuneshipError

_METRICS: dict[str, Any] = {}


def metrics() -> dict[str, Any]:
    """Created once per process, in the default registry vLLM's /metrics serves (also in its
    multiprocess mode: these classes then write to PROMETHEUS_MULTIPROC_DIR)."""
    if _METRICS:
        return _METRICS
    from prometheus_client import Counter, Gauge

    _METRICS.update(
        bundle=Gauge(
            "tuneship_bundle_info",
            "The bundle being served (value 1).",
            [
                "bundle",
                "base_model",
                "adapter_sha256",
                "quantization",
                "served_as",
                "tuneship_version",
            ],
            multiprocess_mode="max",
        ),
        requests=Counter(
            "tuneship_requests", "API requests by key id and status.", ["key_id", "status"]
        ),
        tokens=Counter(
            "tuneship_tokens", "Tokens by key id and kind (prompt, completion).", ["key_id", "kind"]
        ),
        keys_file_errors=Counter(
            "tuneship_keys_file_errors",
            "Failed reads of the keys file (missing, unreadable); the last good keys stay.",
            ["reason"],
        ),
        auth_failures=Counter(
            "tuneship_auth_failures", "Requests refused for a missing or wrong key.", ["reason"]
        ),
        rejected=Counter(
            "tuneship_rejected",
            "Requests refused: 503 (overload, draining), 429 (key_limit).",
            ["reason"],
        ),
        inflight=Gauge(
            "tuneship_inflight_requests", "API requests in progress.", multiprocess_mode="livesum"
        ),
    )
    return _METRICS


def bundle_labels(bundle_dir: str | None, served_as: str | None = None) -> dict[str, str]:
    """Labels of tuneship_bundle_info, from the served bundle's bundle.json, and how vLLM holds
    its weights here (served_as: e.g. a W4A16 bundle dequantized where vLLM has no 4-bit
    kernel)."""
    from tuneship import __version__

    labels = {
        "bundle": "unknown",
        "base_model": "unknown",
        "adapter_sha256": "",
        "quantization": "",
        "served_as": served_as or "",
        "tuneship_version": __version__,
    }
    if bundle_dir is None:
        return labels
    try:
        manifest = read_bundle(Path(bundle_dir))
    except TuneshipError:
        return labels
    return labels | {
        "bundle": manifest.served_model_name,
        "base_model": Path(manifest.base.path or manifest.base.ref).name,
        "adapter_sha256": manifest.run.adapter.get("adapter_model.safetensors", "")[:16],
        "quantization": manifest.quantization.scheme,
    }
