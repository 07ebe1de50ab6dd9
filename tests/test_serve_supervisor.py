"""`tuneship serve`'s supervisor (SIGTERM -> drain -> stop) around a stand-in for vLLM's API
server: a few lines of the standard library that load for a while, then answer the drain
protocol (SIGUSR1, /tuneship/inflight) slowly, as a busy server does. The timings that decide
these cases cannot be forced on real vLLM; test_serve_production drains real vLLM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, fake_bundle
from tuneship.infra.errors import TuneshipError
from tuneship.infra.launch import Server, free_port

DOCKERFILE_SERVE = REPO / "Dockerfile.serve"
STAND_IN = r"""
import http.server, json, os, signal, sys, threading, time
port, load_s, reply_delay_s, busy_s = int(sys.argv[1]), *map(float, sys.argv[2:5])
events = open(sys.argv[5], "a", buffering=1)
def on_sigterm(*_):
    events.write("sigterm\n")
    if os.environ.get("STAND_IN_ENGINE_DIES"):  # as vLLM's engine does on a group SIGTERM
        sys.stderr.write(open(os.environ["STAND_IN_ENGINE_DIES"]).read())
        sys.stderr.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, on_sigterm)
events.write("started\n")
time.sleep(load_s)  # loading the model: no drain handler, nothing listening
if os.environ.get("STAND_IN_DIES_BY"):  # vLLM killed (the OOM killer, say)
    os.kill(os.getpid(), int(os.environ["STAND_IN_DIES_BY"]))
if os.environ.get("STAND_IN_ENGINE_DIES") and not os.environ.get("STAND_IN_ONLY_ON_SIGTERM"):
    # a request kills the engine; the server goes on
    threading.Timer(1, lambda: sys.stderr.write(open(os.environ["STAND_IN_ENGINE_DIES"]).read())
                    or sys.stderr.flush()).start()
drain_at = []
def on_usr1(*_):
    drain_at.append(time.monotonic())
    events.write("sigusr1\n")
signal.signal(signal.SIGUSR1, on_usr1)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(reply_delay_s)  # busy: the reply comes late
        left = 1 if not drain_at or time.monotonic() - drain_at[0] < busy_s else 0
        body = json.dumps({"inflight": left, "draining": bool(drain_at)}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

SUPERVISE = (
    "import json, os, sys; from tuneship.serve.run import supervise; "
    "sys.exit(supervise(json.loads(sys.argv[1]), dict(os.environ), '127.0.0.1', "
    "int(sys.argv[2]), 30))"
)


def start(tmp_path: Path, load_s: float, reply_delay_s: float, busy_s: float, env=None, pid1=(),
          session: bool = False):  # fmt: skip
    port = free_port()
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    events = tmp_path / "events"
    child = [sys.executable, str(script), str(port), str(load_s), str(reply_delay_s),
             str(busy_s), str(events)]  # fmt: skip
    proc = subprocess.Popen(
        [*pid1, sys.executable, "-c", SUPERVISE, json.dumps(child), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | (env or {}),
        start_new_session=session,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not events.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the stand-in runs: the supervisor is past its start-up
    return proc, events


def log_events(output: str) -> dict[str, dict]:
    lines = [json.loads(x) for x in output.splitlines() if x.startswith('{"time"')]
    return {line["event"]: line for line in lines}


def test_sigterm_while_vllm_loads_stops_it_cleanly_and_exits_0(tmp_path):
    proc, events = start(tmp_path, load_s=3, reply_delay_s=0, busy_s=0)
    time.sleep(0.5)  # the stand-in is still "loading": a SIGUSR1 now would kill it if not ignored
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    logged = log_events(output)
    assert proc.returncode == 0, output
    assert logged["drained"]["inflight_left"] == 0  # nothing listens yet: nothing in flight
    assert logged["stopped"]["vllm_exit_code"] == 0, output  # ended by SIGTERM, not by SIGUSR1
    assert events.read_text().splitlines() == ["started", "sigterm"]


@pytest.mark.processes
def test_a_busy_server_is_waited_for_until_its_requests_finish(tmp_path):
    # inflight replies take 3 s (longer than the supervisor used to wait for one) and the
    # request in flight needs 4 s after the drain signal
    proc, events = start(tmp_path, load_s=0, reply_delay_s=3, busy_s=4)
    time.sleep(0.5)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    logged = log_events(output)
    assert proc.returncode == 0, output
    assert logged["drained"]["inflight_left"] == 0, output
    assert logged["drained"]["seconds"] >= 4
    assert time.monotonic() - sent >= 4
    assert events.read_text().splitlines() == ["started", "sigusr1", "sigterm"]


@pytest.mark.processes
def test_docker_stop_on_the_serve_image_drains_before_vllm_hears_of_it(tmp_path):
    """The serve image's PID 1 (its ENTRYPOINT up to `tuneship`) gets docker's or the
    kubelet's SIGTERM. dumb-init's default forwards it to the whole process group, vLLM
    included, which then stopped at once, undrained, and died of the drain signal (exit 138):
    only tuneship serve may hear it."""
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE_SERVE.read_text(), re.M)
    argv = json.loads(entrypoint.group(1))
    pid1 = argv[: argv.index("tuneship")]
    assert pid1[0] == "dumb-init", pid1
    pid1[0] = str(Path(sys.executable).parent / "dumb-init")
    proc, events = start(tmp_path, load_s=0, reply_delay_s=0, busy_s=1, pid1=pid1)
    time.sleep(1)  # the stand-in listens
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert log_events(output)["drained"]["inflight_left"] == 0, output
    assert events.read_text().splitlines() == ["started", "sigusr1", "sigterm"]


def test_vllm_killed_by_a_signal_exits_128_plus_its_number(tmp_path):
    proc, _ = start(tmp_path, load_s=0, reply_delay_s=0, busy_s=0, env={"STAND_IN_DIES_BY": "9"})
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + 9, output  # as a shell reports it, never negative


def test_an_engine_that_dies_stops_serve_at_once_with_the_cause_in_one_line(tmp_path):
    """vLLM's API server, its engine dead, answers 500s for a while and then exits 0: serve
    stops it as soon as vLLM says so, names the cause (vLLM's own words, from a real failure:
    tests/data/vllm-engine-death.log) and exits 1, so the pod restarts and its log says why."""
    death = REPO / "tests" / "data" / "vllm-engine-death.log"
    proc, events = start(tmp_path, load_s=0, reply_delay_s=0, busy_s=0,
                         env={"STAND_IN_ENGINE_DIES": str(death)})  # fmt: skip
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, output
    cause = "torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler"
    assert log_events(output)["engine_dead"]["cause"].startswith(cause)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: vLLM's engine died: {cause}")
    assert "EngineDeadError" in output  # vLLM's own output still passes through
    assert events.read_text().splitlines() == ["started", "sigterm"]


def test_an_engine_stopped_by_a_group_signal_is_a_stop_not_a_death(tmp_path):
    """`timeout`, a terminal's Ctrl-C or a group kill reach vLLM's engine with the same signal:
    its shutdown prints an engine-death traceback, and serve must take it for the stop it is
    (exit 0, drained), not report a dead engine and exit 1."""
    death = REPO / "tests" / "data" / "vllm-engine-death.log"
    env = {"STAND_IN_ENGINE_DIES": str(death), "STAND_IN_ONLY_ON_SIGTERM": "1"}
    proc, events = start(tmp_path, load_s=0, reply_delay_s=0, busy_s=0, env=env, session=True)
    time.sleep(1)  # the stand-in listens
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "engine_dead" not in output and "error:" not in output
    assert "EngineDeadError" in output and "sigterm" in events.read_text()


SLOW_VERIFY = r"""
import sys, time
from pathlib import Path
import tuneship.infra.fsutil as fsutil
import tuneship.serve.run as serve_run
from tuneship.config.schema import ServeConfig
def slow_hash(path, chunk=1 << 20):
    print("hashing", flush=True)
    time.sleep(30)  # a 70B bundle on network storage
serve_run.vllm_flavour = lambda: "cpu"
fsutil.sha256_file = slow_hash
sys.exit(serve_run.run(Path(sys.argv[1]), ServeConfig()))
"""


def test_sigterm_while_the_bundle_is_hashed_stops_at_once_and_exits_0(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_VERIFY, str(fake_bundle(tmp_path / "b"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "hashing"
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert time.monotonic() - sent < 10
    assert log_events(output)["sigterm"]["before"] == "vllm_started", output


def test_a_server_that_dies_at_start_up_is_reported_with_its_cause(tmp_path):
    """vLLM's engine prints why it failed, then pages of tracebacks from every process that
    waited on it: the error must carry the cause, not only the last tracebacks."""
    script = (
        "import sys\n"
        "print('INFO loading the model')\n"
        "print('(EngineCore pid=7) ERROR 12-02 Bus error: not enough shared memory (/dev/shm)')\n"
        "for n in range(100): print(f'  File \"entry.py\", line {n}, in wait')\n"
        "print('RuntimeError: Engine core initialization failed.')\n"
        "sys.exit(1)\n"
    )
    server = Server([sys.executable, "-c", script], free_port(), tmp_path / "log", timeout_s=30)
    with pytest.raises(TuneshipError) as failed:
        server.__enter__()
    message = str(failed.value)
    assert "server exited with 1 before it was ready" in message
    assert "not enough shared memory" in message
    assert message.strip().endswith("RuntimeError: Engine core initialization failed.")
    assert "INFO loading the model" not in message
