"""Stage manifests: runs/NAME/run.json and bundles/NAME/bundle.json, typed on both sides.

Every section is a pydantic model that the writer fills and every reader gets back. Reading is
strict for the keys a later stage relies on and tolerant of keys it does not know (a newer
tuneship's, or an older one's that were since removed): those are reported once, as a warning.
The schema version is checked: a manifest newer than this tuneship understands is refused.
Written atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneship import __version__
from tuneship.chat.tool_template import (
    DEFAULT_TOOL_STRICT_LEVEL,
    ToolStrictLevel,
    tool_arguments,
)
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import hash_tree, sha256_file, write_json_atomic
from tuneship.quality.probes import EvalItem, ProbeChat, ProbeRequest
from tuneship.quality.tool_calls import ToolItem

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
BUNDLE_FILE = "bundle.json"
CHECKS_FILE = "checks.json"
PENDING = "pending: run `tuneship bundle check BUNDLE` where vLLM is installed (the serve image)"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Section(BaseModel):
    """A manifest section: unknown keys are kept on read (and reported), never an error."""

    model_config = ConfigDict(extra="allow")

    def unknown_keys(self, prefix: str = "") -> list[str]:
        """Dotted names of the keys read that this tuneship has no field for."""
        found = [f"{prefix}{key}" for key in self.model_extra or {}]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, dict):
                value = list(value.values())
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, Section):
                    found += child.unknown_keys(f"{prefix}{name}.")
        return sorted(set(found))


class Header(Section):
    schema_version: int
    kind: str
    name: str
    created: str
    tuneship_version: str


# --- run.json -------------------------------------------------------------------------------


class BaseInfo(Section):
    """The base model a run trained on, as the export must find it again."""

    ref: str = Field(description="What the config named: 'default', a folder or a hub id.")
    path: str = Field(description="Where it was loaded from (a folder, or the hub id).")
    weights_sha256: dict[str, str] = {}
    chat_template_sha256: str | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    quantized_origin: str | None = Field(
        None,
        description="Where the base's weights were dequantized from, when they were (the "
        "embedded default: a Q4_1 GGUF): 4-bit export then costs it more than any fine-tune.",
    )


class DatasetRecord(Section):
    path: str
    role: str = "train"
    sha256: str
    invalid: int = 0
    skipped: bool = False


class EvalSplit(Section):
    source: str | None = None
    conversations: int = 0
    leaks: int = 0
    leak_examples: list[dict[str, str]] = []
    used: int | None = None
    dropped_overlong: int | None = None
    truncated: int | None = None
    tokens: int | None = None
    trained_tokens: int | None = None
    trained_share: float | None = None


class SourceShare(Section):
    path: str
    weight: float | None = None
    distill: bool = False
    conversations: int
    in_mix: int
    share: float


class ExampleStats(Section):
    """What training saw: conversations used and dropped, tokens, and the mix."""

    used: int
    dropped_overlong: int = 0
    truncated: int = 0
    tokens: int
    trained_tokens: int
    trained_share: float
    duplicates_dropped: int = 0
    duplicate_ids: list[str] = []
    eval: EvalSplit = Field(default_factory=EvalSplit)
    sources: list[SourceShare] = []


class DeviceInfo(Section):
    precision: str
    precision_reason: str | None = Field(
        None,
        description="Why this precision (tuneship/modelops/precision.py's rule, or the config).",
    )
    machine: str | None = Field(None, description="The machine's compute capability, in words.")
    qlora: bool = False
    world_size: int = 1


class BestEval(Section):
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    restored: bool = False


class TrainMetrics(Section):
    steps: int
    max_steps: int | None = None
    epochs: float | None = None
    resumed_from_step: int | None = None
    loss: list[tuple[int, float]] = []
    final_loss: float | None = None
    train_loss: float | None = None
    eval_loss: list[tuple[int, float]] = []
    best: BestEval | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    world_size: int = 1
    distributed: str | None = None
    cuda: bool = False
    plots: list[str] = []


class Distillation(Section):
    """The targets the distilled rows learned: the base model's top-k next tokens, computed
    once before training (train/teacher.py)."""

    rows: int
    positions: int
    top_k: int
    targets_sha256: str
    seconds: float | None = Field(None, description="Time to compute them (None: from cache).")


class ToolCalling(Section):
    """How a run trained tool calls: the template that rendered them and the vLLM parser that
    reads what it taught (tuneship/chat/tool_template.py), and how many there were."""

    template: str
    parser: str
    conversations: int
    calls: int


class RunManifest(Header):
    kind: Literal["tuneship.run"]
    base: BaseInfo
    datasets: list[DatasetRecord]
    examples: ExampleStats
    distillation: Distillation | None = None
    config: dict[str, Any] = Field(
        description="The resolved TrainConfig, verbatim. Readers take what they need through "
        "a tolerant view (tuneship.config.schema.DataMix), so keys a later tuneship removed or "
        "added never stop an old run from exporting."
    )
    versions: dict[str, str] = {}
    device: DeviceInfo
    lora_targets: dict[str, list[str]] | None = Field(
        None,
        description="What got adapters: linear layers by name (modules) and expert tensors "
        "(parameters), as resolved from the model (lora.target_modules: auto).",
    )
    tool_calling: ToolCalling | None = None
    metrics: TrainMetrics
    adapter: dict[str, str] = Field(description="sha256 of every file in adapter/.")


# --- bundle.json ----------------------------------------------------------------------------


class RunRef(Section):
    name: str
    path: str
    run_json_sha256: str | None = None
    datasets: list[DatasetRecord] = []
    adapter: dict[str, str] = {}


class MergeInfo(Section):
    into: str
    dtype: str | None = Field(None, description="What the merged weights are stored in.")
    seconds: float | None = None


class ComputeInfo(Section):
    """The precision a stage computed in (merge, GPTQ, perplexities), why, and on what."""

    precision: str
    reason: str
    machine: str


class CalibrationInfo(Section):
    samples: int
    tokens: int
    max_length: int
    seed: int
    ids: list[str] = []
    mix: str | None = None  # "datasets", "tokens" or "rows" (ExportConfig.calibration_mix)
    datasets: dict[str, int] = {}  # conversations drawn from each training dataset


class ScaleTuningInfo(Section):
    """The group scales tuned after GPTQ toward the merged model (ExportConfig.scale_tuning_*):
    the mean KL divergence per assistant token of the first and of the last 16 conversations
    drawn (fewer on a small sample)."""

    epochs: float
    learning_rate: float
    steps: int
    kl_first: float | None = None
    kl_last: float | None = None
    largest_change: float = 0.0  # the most any scale moved, relative
    seconds: float | None = None


class QuantizationInfo(Section):
    scheme: str
    engine: str | None = None
    algorithm: str | None = None
    format: str | None = None
    num_bits: int | None = None
    symmetric: bool | None = None
    group_size: int | None = None
    ignore: list[str] = []
    dampening_frac: float | None = None
    observer: str | None = None
    calibration: CalibrationInfo | None = None
    scale_tuning: ScaleTuningInfo | None = None
    seconds: float | None = None


class Check(Section):
    """One check's verdict (None: skipped, with the reason); its figures are the other keys."""

    passed: bool | None = None
    reason: str | None = None

    def figures(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def unknown_keys(self, prefix: str = "") -> list[str]:
        return []  # a check's other keys are its figures


class CheckPrompt(Section):
    id: str
    messages: list[dict[str, Any]]
    facts: list[str] = []
    trained_ids: list[int] = Field(description="Token ids training used for prompt + reply.")

    def item(self) -> EvalItem:
        facts = tuple(self.facts)
        return EvalItem(self.id, tuple(self.messages), None, facts[0] if facts else None, facts[1:])


class ToolCheckPrompt(Section):
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    call: dict[str, Any] | None = Field(description="The expected call; None: no call.")
    fact: str | None = None
    trained_ids: list[int] = Field(description="Token ids training used for prompt + reply.")

    @classmethod
    def of(cls, item: ToolItem, trained_ids: list[int]) -> ToolCheckPrompt:
        return cls(
            id=item.id,
            messages=list(item.messages),
            tools=list(item.tools),
            call=item.call,
            fact=item.fact,
            trained_ids=trained_ids,
        )

    def item(self) -> ToolItem:
        return ToolItem(self.id, tuple(self.messages), tuple(self.tools), self.call, self.fact)

    def chat(self) -> ProbeChat:
        return ProbeChat(id=self.id, messages=self.item().wire_messages(), tools=self.tools)


class ToolCheckPlan(Section):
    """The tool check of a run trained on tool calls: its prompts, the parser, the thresholds."""

    data: str = Field(description="Where the tool prompts came from.")
    parser: str = Field(description="vLLM's tool parser the bundle is served with.")
    strict_level: ToolStrictLevel = Field(
        DEFAULT_TOOL_STRICT_LEVEL, description="vLLM's --tool-strict-level, as serve's default."
    )
    prompts: list[ToolCheckPrompt]
    min_parse_rate: float
    min_right_calls: float
    max_right_calls_drop: float
    merged_right: list[bool | None] | None = Field(
        None, description="The merged 16-bit model's right calls: the baseline."
    )


class CheckPlan(Section):
    """What the vLLM checks need, recorded by the export in bundle.json."""

    data: str = Field(description="Where the prompts came from.")
    prompts: list[CheckPrompt]
    bos_token_id: int | None = None
    max_tokens: int
    min_stop_rate: float
    max_recall_drop: float
    max_perplexity_ratio: float
    perplexity_merged: float | None = None
    perplexity_quantized: float | None = None
    merged_answers: list[str | None] | None = Field(
        None, description="The merged 16-bit model's greedy answers: the recall baseline."
    )
    stop_tokens: Check = Field(description="Tokenizer, generation_config and template agree.")
    tools: ToolCheckPlan | None = Field(None, description="The tool check (runs with tools).")

    def request(self, max_model_len: int, extra_args: list[str] | None = None) -> ProbeRequest:
        """The plain prompts, then the tool prompts (served with the bundle's tool parser)."""
        tool_prompts = self.tools.prompts if self.tools else []
        tools = tool_arguments(self.tools.parser, self.tools.strict_level) if self.tools else []
        return ProbeRequest(
            max_model_len=max_model_len,
            max_tokens=self.max_tokens,
            extra_args=[*(extra_args or []), *tools],
            tokenize=[p.messages for p in self.prompts],
            tool_tokenize=[p.chat() for p in tool_prompts],
            chats=[ProbeChat(id=p.id, messages=p.messages) for p in self.prompts]
            + [p.chat() for p in tool_prompts],
        )


class AdapterEntry(Section):
    run: str
    run_json_sha256: str
    rank: int
    files: dict[str, str]


class Sizes(Section):
    model_bytes: int
    merged_bytes: int | None = None
    adapters_bytes: int | None = None


class ServingInfo(Section):
    max_model_len: int
    architecture: str | None = None
    startup_s: float | None = None
    peak_rss_bytes: int | None = None
    max_lora_rank: int | None = None
    tool_parser: str | None = None  # vLLM's parser for the calls the model was trained to write
    # the vLLM engine settings the preflight ran with (None: vLLM's default); serve's defaults
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None


class BundleManifest(Header):
    kind: Literal["tuneship.bundle"]
    served_model_name: str
    layout: Literal["merged", "adapters"] = "merged"
    config: dict[str, Any] = Field(
        default_factory=dict, description="The ExportConfig the bundle was made with, verbatim."
    )
    adapters: dict[str, AdapterEntry] = {}
    run: RunRef
    base: BaseInfo
    merge: MergeInfo
    quantization: QuantizationInfo
    compute: ComputeInfo | None = Field(
        None, description="What the export computed in (stored tensors are bf16 whatever it was)."
    )
    files: dict[str, str]
    merged_files: dict[str, str] = {}
    sizes: Sizes
    checks: dict[str, Check] = {}
    check_plan: CheckPlan | None = Field(
        None, description="What the vLLM checks ask and compare (also the serve self-test)."
    )
    versions: dict[str, str] = {}
    serving: ServingInfo

    @field_validator("adapters")
    @classmethod
    def _adapter_names_stay_inside(cls, adapters: dict[str, AdapterEntry]) -> dict:
        """An adapter's name is a folder under adapters/ and a vLLM argument: plain names only."""
        bad = [n for n in adapters if not ADAPTER_NAME.fullmatch(n) or ".." in n]
        if bad:
            raise ValueError(
                f"adapter name {', '.join(map(repr, bad))} is not a plain name "
                "(letters, digits, '.', '_', '-'; no '/' or '..')"
            )
        return adapters

    def failed_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if check.passed is False]

    def pending_checks(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.passed is None and c.reason == PENDING]

    def skipped_checks(self) -> list[str]:
        pending = self.pending_checks()
        return [n for n, c in self.checks.items() if c.passed is None and n not in pending]


class CheckRecord(Header):
    """checks.json: the vLLM checks `tuneship bundle check` ran on a bundle exported with
    checks=later, bound to that bundle.json by its sha256."""

    kind: Literal["tuneship.checks"]
    bundle_json_sha256: str
    checks: dict[str, Check]
    versions: dict[str, str] = {}
    seconds: float | None = None


# --- reading and writing --------------------------------------------------------------------

M = TypeVar("M", bound=Section)
_warned: set[str] = set()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions(*packages: str) -> dict[str, str]:
    found = {"python": sys.version.split()[0], "tuneship": __version__}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def header(kind: str, name: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "name": name,
        "created": now(),
        "tuneship_version": __version__,
    }


def read_manifest(path: Path, model: type[M], what: str, hint: str, sha256: str | None = None) -> M:
    """Read and validate a manifest; errors name the file and the key. With sha256, the file
    must have that digest (the bytes checked are the bytes parsed)."""
    if not path.is_file():
        raise TuneshipError(f"{path} not found: {hint}")
    try:
        raw = path.read_bytes()
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256.lower():
            raise TuneshipError(
                f"{path} has sha256 {hashlib.sha256(raw).hexdigest()}, not the pinned {sha256}: "
                "the manifest was edited, or another bundle is mounted; pin the sha256 of the "
                f"bundle meant to be served (`sha256sum {path}`)"
            )
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise TuneshipError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuneshipError(f"{path} cannot be read: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise TuneshipError(
            f"{path} has schema_version {version}, newer than this tuneship understands "
            f"({SCHEMA_VERSION}); upgrade tuneship"
        )
    try:
        manifest = model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"'{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise TuneshipError(f"{path} is not a valid {what}: {problems}") from None
    extra = manifest.unknown_keys()
    if extra and str(path) not in _warned:
        _warned.add(str(path))
        print(
            f"warning: {path} has keys this tuneship ignores: {', '.join(extra)}", file=sys.stderr
        )
    return manifest


def read_run(run_dir: Path) -> RunManifest:
    return read_manifest(
        Path(run_dir) / RUN_FILE, RunManifest, "run manifest", "is this a `tuneship train` run?"
    )


def read_bundle(bundle_dir: Path, sha256: str | None = None) -> BundleManifest:
    return read_manifest(
        Path(bundle_dir) / BUNDLE_FILE,
        BundleManifest,
        "bundle manifest",
        "is this a `tuneship export` bundle?",
        sha256,
    )


def write_manifest(path: Path, manifest: BaseModel) -> str:
    """Write a manifest atomically; return its sha256."""
    write_json_atomic(path, manifest.model_dump(mode="json", exclude_none=False))
    return sha256_file(path)


def verify_files(root: Path, expected: dict[str, str]) -> list[str]:
    """Problems found re-hashing root against expected {relative path: sha256}."""
    problems = []
    actual = hash_tree(root) if root.is_dir() else {}
    for rel, digest in expected.items():
        if rel not in actual:
            problems.append(f"{root / rel}: missing")
        elif actual[rel] != digest:
            problems.append(f"{root / rel}: sha256 differs from the manifest (corrupted or edited)")
    problems.extend(
        f"{root / rel}: not listed in the manifest" for rel in actual.keys() - expected.keys()
    )
    return problems
