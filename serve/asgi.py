"""Small ASGI helpers: OpenAI-shaped error bodies, plain responses, the routed path, the body."""

from __future__ import annotations

import json
from typing import Any


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json.dumps(payload).encode("utf-8")


def is_cors_preflight(scope: dict) -> bool:
    """OPTIONS with both Origin and Access-Control-Request-Method, as a browser sends it;
    any other OPTIONS request is an ordinary request and needs a key."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {name.lower() for name, _ in scope.get("headers") or []}
    return {b"origin", b"access-control-request-method"} <= names


def route_path(scope: dict) -> str:
    """The path the router matches (as Starlette computes it: without the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class BodyTooLarge(Exception):
    """A request body over the limit (the size seen so far, or the declared one)."""


async def read_body(scope: dict, receive: Any, limit: int) -> tuple[bytes | None, Any]:
    """The whole request body (None if the client left first) and a receive that hands it
    over again, then goes on to the client's own messages (vLLM watches those for a
    disconnect, to abort the generation). BodyTooLarge past limit bytes, declared or sent
    (chunked), before more is read."""
    declared = dict(scope.get("headers") or []).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared))
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge(size)
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return body, replay


async def respond(send: Any, status: int, body: bytes, headers: dict | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
