"""Reading vLLM's output for the cause of a failure (tuneship/infra/engine_log.py)."""

from __future__ import annotations

from tests.support import REPO
from tuneship.infra.engine_log import engine_died, root_cause, strip_prefix

DEATH = (REPO / "tests" / "data" / "vllm-engine-death.log").read_text().splitlines()


def test_the_root_cause_is_the_first_exception_vllms_processes_printed():
    assert root_cause(DEATH) == (
        "torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found "
        "in torch._inductor.config.cpp.cxx: (None, '/bin/false')"
    )
    # an exception named inside a warning's text, or only EngineDeadError, is no cause
    warning = [line for line in DEATH if "OSError" in line]
    dead = [line for line in DEATH if "EngineDeadError" in line]
    assert warning and root_cause(warning) is None and root_cause(dead) is None


def test_engine_death_is_told_by_the_api_servers_line_alone():
    assert [n for n, line in enumerate(DEATH) if engine_died(line)] == [len(DEATH) - 2]


def test_vllms_prefix_is_removed_and_other_lines_kept():
    assert strip_prefix("(Worker pid=3) ERROR 12-06 16:22:41 [x.py:1] ValueError: bad") == (
        "ValueError: bad"
    )
    assert strip_prefix("(APIServer pid=1) KeyError: 'a'") == "KeyError: 'a'"
    assert strip_prefix('  File "a.py", line 1') == '  File "a.py", line 1'
