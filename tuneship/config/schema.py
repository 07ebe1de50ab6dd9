"""Typed stage configs, validated at the boundary (reading them: tuneship/config/loading.py).

User-written configs reject unknown keys and name them (with a close match when there is one);
every problem is collected and reported together, each naming the key and the file.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from tuneship.chat.records import RecordMapping
from tuneship.chat.tool_template import DEFAULT_TOOL_STRICT_LEVEL, ToolStrictLevel

# How GPTQ's calibration sample draws on the training datasets (tuneship/modelops/calibration.py)
CalibrationMix = Literal["datasets", "tokens", "rows"]
# How each weight group's range is picked before GPTQ rounds (llm-compressor's observer names)
WeightObserver = Literal["memoryless_minmax", "memoryless_mse", "imatrix_mse"]

VLLM_DEFAULT_MAX_NUM_SEQS = 256


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input; default 0.05, or 0 where mixture-of-experts "
        "experts are adapted (peft applies no dropout to expert tensors).",
    )

    def dropout_for(self, experts_adapted: bool) -> float:
        """The dropout a run uses; an explicit non-zero one with experts adapted is refused."""
        if self.dropout is None:
            return 0.0 if experts_adapted else 0.05
        if experts_adapted and self.dropout > 0:
            raise ValueError(
                f"lora.dropout {self.dropout}: peft 0.21 trains mixture-of-experts expert "
                "tensors without dropout; set lora.dropout: 0 (or leave it unset), or list the "
                "linear layers in lora.target_modules to leave the experts out"
            )
        return self.dropout

    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        min_length=1,
        description="auto: every linear layer of every decoder block, whatever the family names "
        "it (fused ones too), and mixture-of-experts experts, never a router "
        "(train/targets.py; run.json and --dry-run list them); or a list of layer names.",
    )


class DataSource(StrictModel):
    path: str = Field(
        description="A chat data file: .json, .jsonl (also .gz), .parquet, .csv, or a folder "
        "(datasets' save_to_disk, or .parquet shards). Records: ShareGPT, OpenAI messages, "
        "Alpaca (instruction, input, output, system, history) or question/answer."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of the training mix (relative to the other sources' weights); "
        "sources are resampled, seeded, to these shares. Unset everywhere: concatenate as is.",
    )
    distill: bool = Field(
        False,
        description="Train this source's assistant tokens toward the base model's whole "
        "next-token distribution (KL to the base, the adapter switched off) instead of its "
        "text alone: for replay data that should keep what the base knows.",
    )
    messages_field: str | None = Field(
        None,
        description="The key or column holding each record's list of turns, where it is not "
        "'messages' or 'conversations' (e.g. 'dialog').",
    )
    role_field: str | None = Field(
        None, description="The key of a turn's role, where it is not 'role' (or ShareGPT's 'from')."
    )
    content_field: str | None = Field(
        None,
        description="The key of a turn's text, where it is not 'content' (or ShareGPT's 'value').",
    )
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="The data's own role names and the role each is, e.g. {bot: assistant, "
        "customer: user}.",
    )

    def mapping(self) -> RecordMapping:
        return RecordMapping(
            self.messages_field, self.role_field, self.content_field, tuple(self.role_map.items())
        )


class Distributed(StrictModel):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun / accelerate launch: ddp replicates the model on every "
        "process (LoRA, QLoRA); fsdp shards it (models that do not fit one GPU).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process-group backend: auto = nccl on CUDA, gloo on CPU."
    )
    fsdp_cpu_offload: bool = Field(False, description="FSDP: keep sharded parameters on CPU.")
    low_memory_loading: bool | None = Field(
        None,
        description="FSDP without QLoRA: only rank 0 reads the base weights; the other ranks "
        "build the model empty (meta device) and receive their shards from rank 0 when FSDP "
        "wraps it. null: on when the load converts the checkpoint's dtype (each rank would hold "
        "its own converted copy: 70B in bf16 is 140 GB per process) and no source is distilled; "
        "a checkpoint already in the training dtype is memory-mapped, one copy in the page "
        "cache for all ranks. Distilled sources need it off: their teacher pass runs on every "
        "rank's whole model before training.",
    )
    timeout_s: int = Field(
        1800,
        ge=1,
        description="Seconds a rank waits for the others in a collective (e.g. while rank 0 "
        "tokenizes the data or writes a checkpoint) before the run fails "
        "(init_process_group's timeout).",
    )


class DataMix(StrictModel):
    """The settings that decide which conversations a run trains on: TrainConfig's own fields
    (it extends this), and what export and eval rebuild a run's training mix from. Read from a
    stored run.json through `from_stored`, which ignores keys this tuneship does not know, so a
    run made by another version still exports."""

    data: list[DataSource] = Field(
        min_length=1,
        description="Training files: paths, or {path, weight} to mix sources in fixed shares "
        "(e.g. domain 7 : general 3).",
    )
    dedup: bool = Field(True, description="Drop exact duplicate conversations (all turns equal).")
    eval_data: str | None = Field(
        None, description="Held-out chat file for the eval loss (instead of eval_fraction)."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this seeded share of the training data for eval."
    )
    limit: int | None = Field(
        None, ge=1, description="Train on the first N valid conversations only (smoke tests)."
    )
    seed: int = Field(42, description="Seed for data order, adapter init and dropout.")
    skip_invalid: bool = Field(
        False, description="Skip invalid records (and say how many) instead of refusing the data."
    )
    system_turns: Literal["keep", "fold"] = Field(
        "keep",
        description="keep: system turns as the data has them (refused before training when the "
        "base's template refuses or drops them); fold: their text at the start of the first "
        "user turn, for templates without a system role (Gemma 2, Mistral).",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_sources(cls, value: Any) -> Any:
        return _sources(value)

    @classmethod
    def from_stored(cls, config: dict[str, Any]) -> DataMix:
        known = {k: v for k, v in config.items() if k in DataMix.model_fields}
        known["data"] = [
            {k: v for k, v in source.items() if k in DataSource.model_fields}
            if isinstance(source, dict)
            else source
            for source in _sources(known.get("data", []))
        ]
        return DataMix.model_validate(known)

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_data or self.eval_fraction)


def _sources(value: Any) -> Any:
    if isinstance(value, list):
        return [{"path": item} if isinstance(item, str) else item for item in value]
    return value


class TrainConfig(DataMix):
    """`tuneship train`: the data settings (DataMix) and everything else about the run."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: the run is written to OUTPUT_DIR/NAME.",
    )
    base: str = Field(
        "default",
        description="Base model: 'default' (the embedded SmolLM2-135M-Instruct, see "
        "`tuneship base fetch`), a local Hugging Face checkpoint folder, or a hub id.",
    )
    eval_steps: int = Field(50, ge=1, description="Compute the eval loss every N steps.")
    keep_best: bool = Field(
        False,
        description="Write the adapter with the lowest eval loss instead of the last one "
        "(always so with early_stopping_patience).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after N evaluations without a lower eval loss; the adapter with the "
        "best eval loss is the one written.",
    )
    output_dir: str = Field("runs", description="Folder that receives the run folder.")
    max_length: int = Field(1024, ge=16, description="Longest tokenized conversation trained.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="Conversations longer than max_length: drop them, or truncate them "
        "(a truncated reply loses its end-of-turn token).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: bool = Field(
        False, description="Load the base in 4-bit NF4 (bitsandbytes) and train LoRA on top."
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then linear decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Conversations per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 where the hardware computes it natively (CUDA that supports "
        "it, CPUs with AMX or AVX512-BF16), fp16 on other CUDA GPUs, fp32 on other CPUs "
        "(tuneship/modelops/precision.py). bf16 on a CPU without it is honoured, with a warning: "
        "about 100x slower there.",
    )
    logging_steps: int = Field(5, ge=1, description="Record the loss every N steps.")
    batching: Literal["group_by_length", "sorted", "packed"] = Field(
        "group_by_length",
        description="group_by_length: batches of similar lengths, padded to the longest "
        "(transformers' grouping, within random groups of rows); sorted: all rows sorted by "
        "length, then the batches shuffled (rows of a rare length, such as long tool sessions, "
        "batch together and share their prefix instead of padding short chats); "
        "packed: conversations concatenated without padding, attention kept within each "
        "conversation (position ids restart per conversation).",
    )
    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernel; flash_attention_2 (needs the flash-attn package, CUDA) "
        "runs packed batches as variable-length sequences.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    share_prefix: bool = Field(
        True,
        description="Run the tokens every row of a batch begins with (a system prompt, a tool "
        "list) once per batch and the rest of each row against their keys and values: the same "
        "loss and gradients for less computation. Single-process runs without gradient "
        "checkpointing; off by itself elsewhere and for models whose cache cannot be shared.",
    )
    distill_top_k: int = Field(
        64,
        ge=1,
        description="Distilled rows learn the base model's k most likely next tokens at each "
        "position (the rest of its probability as one bucket), computed once before training.",
    )
    loss_chunk: int = Field(
        1024,
        ge=0,
        description="Tokens per chunk when the loss applies the output layer to the final "
        "hidden states, so the whole batch's fp32 logits never exist (4 GB for 8k tokens of a "
        "128k vocabulary); 0: the model's own loss on full logits.",
    )
    checkpoint_steps: int | None = Field(
        100,
        ge=1,
        description="Write a resumable checkpoint every N steps (null: none). A restarted run "
        "resumes from the newest complete one.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    distributed: Distributed = Field(default_factory=Distributed)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],  # type: ignore[arg-type]
        description="Experiment trackers the Trainer reports to, the run named after `name`: "
        "tensorboard (event files in the run folder's tensorboard/, no network), mlflow "
        "(MLFLOW_TRACKING_URI, default ./mlruns), wandb (WANDB_MODE=offline honoured); each "
        "needs its package in the train environment. [] for none.",
    )
    log_format: Literal["progress", "json"] = Field(
        "progress",
        description="progress: a progress bar with loss, tokens/s and ETA; json: one JSON "
        "object per line on stdout (for log collectors).",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus metrics of the run on this port (rank 0); off when null.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        weighted = [s.weight is not None for s in self.data]
        if any(weighted) and not all(weighted):
            raise ValueError("data: give every source a weight, or none of them")
        if any(s.distill for s in self.data) and self.batching == "packed":
            raise ValueError(
                "data: distill sources need batching: group_by_length or sorted (packed rows mix "
                "sources)"
            )
        if self.eval_data and self.eval_fraction:
            raise ValueError("set eval_data or eval_fraction, not both")
        low_memory = self.distributed.strategy == "fsdp" and self.distributed.low_memory_loading
        if low_memory and any(s.distill for s in self.data):
            raise ValueError(
                "distributed.low_memory_loading: distill sources need every rank to hold the "
                "whole base for their teacher pass before training; set it to false or null"
            )
        if (self.early_stopping_patience or self.keep_best) and not self.has_eval:
            raise ValueError(
                "early_stopping_patience and keep_best need eval_data or eval_fraction"
            )
        return self

    @property
    def data_paths(self) -> list[str]:
        return [source.path for source in self.data]

    def data_mix(self) -> DataMix:
        return DataMix.from_stored(self.model_dump())


def _engine_fields() -> dict[str, Any]:
    """vLLM engine settings for big models, shared by the export's preflight and serve."""
    return {
        "tensor_parallel_size": Field(
            None,
            ge=1,
            description="GPUs one replica spreads the model over (vLLM --tensor-parallel-size; "
            "default 1).",
        ),
        "gpu_memory_utilization": Field(
            None,
            gt=0,
            le=1,
            description="Share of each GPU's memory vLLM may take for weights, activations and "
            "the KV cache (vLLM --gpu-memory-utilization; default 0.9).",
        ),
        "max_num_batched_tokens": Field(
            None,
            ge=16,
            description="Tokens scheduled in one engine step (vLLM --max-num-batched-tokens): "
            "prefill chunk size against latency.",
        ),
    }


ENGINE_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "max_num_batched_tokens")


class ExportConfig(StrictModel):
    scheme: Literal["W4A16", "W4A16_ASYM"] = Field(
        "W4A16",
        description="Weight-only 4-bit, 16-bit activations (llm-compressor's preset names): "
        "W4A16 is symmetric, W4A16_ASYM adds a zero point per group, which fits skewed "
        "weight groups better (vLLM loads both, on GPU and CPU).",
    )
    group_size: int | None = Field(
        None,
        ge=8,
        description="Quantization group size; default: the largest of 128/64/32 that divides "
        "every quantized layer's input width.",
    )
    calibration_samples: int = Field(
        64, ge=1, description="Training conversations sampled (seeded) to calibrate GPTQ."
    )
    calibration_mix: CalibrationMix = Field(
        "datasets",
        description="How the calibration sample draws on the training datasets: datasets, an "
        "equal share of the rows each (a small dataset with a behaviour of its own, such as tool "
        "calls, is calibrated on as much as a large one); tokens, an equal share of the tokens "
        "each (a dataset of few but long conversations does not outweigh the others); rows, in "
        "proportion to their rows.",
    )
    calibration_max_length: int = Field(
        512, ge=16, description="Tokens kept per calibration conversation."
    )
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening.")
    observer: WeightObserver = Field(
        "memoryless_minmax",
        description="How each group's scale and zero point are chosen before GPTQ rounds "
        "(llm-compressor's observer names): memoryless_minmax spans the group's min and max; "
        "memoryless_mse searches for the clipping with the least squared error; imatrix_mse "
        "weighs that error by how strongly the calibration activations use each input channel.",
    )
    scale_tuning_epochs: float = Field(
        0,
        ge=0,
        le=20,
        description="After GPTQ, passes over the calibration sample that tune each group's "
        "scale, its 4-bit integers fixed, so that the bundle's next-token distributions on the "
        "assistant turns come closer to the merged model's (KL divergence); 0: GPTQ alone. The "
        "bundle keeps its format and size. Costs about a training epoch over the sample.",
    )
    scale_tuning_lr: float = Field(
        1e-3,
        gt=0,
        le=0.1,
        description="Adam's step for scale tuning: the relative change of a scale per step.",
    )
    scale_tuning_batch: int = Field(
        32,
        ge=1,
        description="Conversations per scale-tuning step: one conversation's gradient is mostly "
        "noise, and Adam takes a full step on whatever it is given.",
    )
    keep_16bit: list[str] = Field(
        default_factory=list,
        description="Linear layers left unquantized, besides lm_head: module names or "
        "llm-compressor 're:' patterns, e.g. 're:.*layers\\.(0|29)\\..*' for the first and "
        "last block; each must match a layer.",
    )
    seed: int = Field(0, description="Seed of the calibration sample.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="What merge, GPTQ and the quality checks compute in; auto: the machine's "
        "rule, as for train (bf16 where native, else fp32 on CPU). The bundle is stored the "
        "same way whatever it is (16-bit tensors in bf16).",
    )
    served_name: str | None = Field(
        None, description="Model name clients use; default: the bundle folder's name."
    )
    keep_merged: bool = Field(
        False, description="Also keep the merged 16-bit checkpoint in the bundle (merged/)."
    )
    eval_data: str | None = Field(
        None,
        description="Held-out questions (JSONL: question, fact, answer) for the quality gate "
        "and the vLLM checks; default: a seeded sample of the training conversations.",
    )
    checks: Literal["auto", "now", "later", "off"] = Field(
        "auto",
        description="The vLLM checks (template parity, stop tokens, recall, preflight): now "
        "runs them through the serve environment's vLLM; later records what they need in "
        "bundle.json for `tuneship bundle check` (the serve image), and serving refuses the "
        "bundle until it has run; auto: now where the serve environment is found, else later; "
        "off records them as skipped. (true/false: now/off.)",
    )
    serve_bin: str | None = Field(
        None,
        description="The serve environment's tuneship; default: $TUNESHIP_SERVE_BIN, else "
        ".venv/serve/bin/tuneship.",
    )
    check_samples: int = Field(
        64, ge=1, description="Most held-out prompts used by the checks and the quality gate."
    )
    check_max_tokens: int = Field(
        128, ge=1, description="Reply budget of the stop-token and recall checks."
    )
    min_stop_rate: float = Field(
        0.95, ge=0, le=1, description="Share of greedy replies that must end with 'stop'."
    )
    max_perplexity_ratio: float = Field(
        1.10, gt=0, description="Quality gate: quantized / merged perplexity at most this."
    )
    max_lora_rank: int = Field(
        64, ge=1, description="Adapters-only bundles: adapters above this rank are rejected."
    )
    max_recall_drop: float = Field(
        5.0, ge=0, description="Quality gate: fact recall may drop at most this many points."
    )
    tool_eval_data: str | None = Field(
        None,
        description="Tool prompts (JSONL: messages, tools, the expected call or null) the tool "
        "check asks a run trained on tool calls; default: a seeded sample of the training "
        "conversations with calls, asked up to their first call.",
    )
    min_tool_parse_rate: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Tool check: of the replies that call, the share vLLM's tool parser must "
        "read (below it, the served parser cannot read what the model was trained to write).",
    )
    min_right_calls: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Tool check: the bundle's share of tool prompts answered with the expected "
        "function and arguments.",
    )
    max_right_calls_drop: float = Field(
        10.0,
        ge=0,
        description="Tool check: the bundle's share of right calls may be at most this many "
        "points below the merged 16-bit model's (judged where vLLM runs at export).",
    )
    tensor_parallel_size: int | None = _engine_fields()["tensor_parallel_size"]
    gpu_memory_utilization: float | None = _engine_fields()["gpu_memory_utilization"]
    max_num_batched_tokens: int | None = _engine_fields()["max_num_batched_tokens"]
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="Sequences generated at once (vLLM --max-num-seqs). These four run the "
        "preflight and are recorded in bundle.json's serving section; serve uses them unless "
        "its own settings override them.",
    )

    def engine(self) -> dict[str, Any]:
        """The preflight's engine settings, as bundle.json records them."""
        return {k: getattr(self, k) for k in (*ENGINE_KEYS, "max_num_seqs")}

    @field_validator("checks", mode="before")
    @classmethod
    def _checks_as_words(cls, value: Any) -> Any:
        """true/false, as older configs and bundles have them: now/off."""
        return {True: "now", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ServeConfig(StrictModel):
    """`tuneship serve`: from a YAML file (--config), TUNESHIP_<KEY> environment variables
    (containers), --set KEY=VALUE and the command's options, each overriding the one before."""

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length served (default: the bundle's)."
    )
    bundle_sha256: str | None = Field(
        None,
        description="Pin the bundle: the sha256 of its bundle.json (`sha256sum bundle.json`); "
        "a bundle whose manifest differs is refused (an edited manifest could vouch for "
        "edited weights).",
    )
    eager: bool | None = Field(
        None,
        description="true: no CUDA graphs or torch.compile (faster start); false: compile "
        "(faster steady state); default: eager on CPU, compiled on GPU.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="API keys, comma-separated, each a key or name:key (set it as "
        "TUNESHIP_API_KEYS, never in a file or on the command line); api_keys_file is better "
        "for rotation.",
        json_schema_extra={"cli": False},
    )
    api_keys_file: str | None = Field(
        None,
        description="File of API keys, one per line, a key or name:key (the name is its id in "
        "logs and metrics), '#' comments (e.g. a mounted Secret); re-read every second.",
    )
    key_id_secret: SecretStr | None = Field(
        None,
        min_length=16,
        description="Secret for the ids of unnamed keys in logs and metrics (a keyed hash); "
        "set it as TUNESHIP_KEY_ID_SECRET, the same on every replica. Unset: a random one "
        "per start. Named keys (name:key) are known by their name.",
        json_schema_extra={"cli": False},
    )
    metrics_auth: bool = Field(False, description="Require an API key for /metrics too.")
    api_docs: bool = Field(
        False, description="Serve vLLM's API docs (/docs, /openapi.json), without a key."
    )
    tool_strict_level: ToolStrictLevel = Field(
        DEFAULT_TOOL_STRICT_LEVEL,
        description="For a bundle trained on tool calls, once the model starts a call: "
        "parameter holds it to a declared function and to arguments that fit its schema (what "
        "the export's tool check measured); function, to a declared function only; auto, only "
        "where the request's tool_choice or a tool's `strict` asks (vLLM --tool-strict-level).",
    )
    vllm_dev_mode: bool = Field(
        False,
        description="Allow VLLM_SERVER_DEV_MODE / VLLM_ALLOW_RUNTIME_LORA_UPDATING in the "
        "environment and let key holders reach every route vLLM serves (sleep, RPCs, "
        "adapter loading): development only; otherwise serve refuses to start with them set.",
    )
    log_prompts: bool = Field(
        False, description="Put request and response bodies in the request log."
    )
    max_running: int | None = Field(
        None,
        ge=1,
        description="Sequences generated at once (vLLM --max-num-seqs; default: the bundle's, "
        "else 256).",
    )
    max_waiting: int | None = Field(
        None,
        ge=0,
        description="Requests waiting beyond the running ones; more get 503 + Retry-After, "
        "before their response starts, streams too (default: unbounded). A request counts "
        "once per sequence it asks for (n, a list of prompts).",
    )
    tensor_parallel_size: int | None = _engine_fields()["tensor_parallel_size"]
    gpu_memory_utilization: float | None = _engine_fields()["gpu_memory_utilization"]
    max_num_batched_tokens: int | None = _engine_fields()["max_num_batched_tokens"]
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory per device for --dry-run's KV-cache estimate (default: the "
        "first visible GPU's).",
    )
    max_per_key: int | None = Field(
        None,
        ge=1,
        description="Sequences one key may have in flight at once; more get 429 + Retry-After "
        "(rate_limit_exceeded), so one client cannot fill every slot (default: no bound; "
        "without keys, every request shares this one bound).",
    )
    max_request_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest request body accepted (bytes); larger ones get 413 before vLLM "
        "reads them.",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds in-flight requests get to finish before vLLM stops.",
    )
    stop_timeout: float = Field(
        15.0,
        ge=1,
        description="After the drain: seconds vLLM gets to stop before it is killed. A pod's "
        "terminationGracePeriodSeconds must exceed preStop + drain_timeout + stop_timeout.",
    )
    retry_after: int = Field(
        2, ge=1, description="Seconds a refused client is told to wait (Retry-After on 503)."
    )
    self_test: bool = Field(
        True,
        description="Stay not-ready until a few of the bundle's check prompts give, through "
        "this server, the token ids training used and stop on the end-of-turn token (seconds); "
        "a failure stops the server with the reason.",
    )

    @field_serializer("api_keys", "key_id_secret", when_used="json")
    def _reveal_only_when_asked(self, keys: SecretStr | None, info) -> str | None:
        """JSON for the server process carries the keys (context reveal); any other dump
        shows them masked."""
        if keys is None:
            return None
        return keys.get_secret_value() if (info.context or {}).get("reveal") else str(keys)

    def with_bundle_engine(self, serving: Any) -> ServeConfig:
        """Engine settings left unset taken from the bundle (what its preflight ran with)."""
        taken = {k: getattr(serving, k, None) for k in ENGINE_KEYS if getattr(self, k) is None}
        if self.max_running is None:
            taken["max_running"] = getattr(serving, "max_num_seqs", None)
        return self.model_copy(update={k: v for k, v in taken.items() if v is not None})

    @property
    def capacity(self) -> int | None:
        """Sequences admitted at once (running + waiting); None: unbounded."""
        if self.max_waiting is None:
            return None
        return (self.max_running or VLLM_DEFAULT_MAX_NUM_SEQS) + self.max_waiting

    @field_validator("bundle_sha256")
    @classmethod
    def _a_sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("bundle_sha256 must be 64 hex digits (`sha256sum bundle.json`)")
        return value.lower() if value else value

    def key_list(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [k.strip() for k in raw.split(",") if k.strip()]


class EvalTargets(StrictModel):
    min_recall: float = Field(
        0.8, ge=0, le=1, description="Fine-tuned (merged 16-bit) held-out fact recall, at least."
    )
    max_base_recall: float = Field(
        0.1,
        ge=0,
        le=1,
        description="The base model's held-out fact recall, under this (else the questions "
        "test what the base model already knew).",
    )
    max_quantized_drop: float = Field(
        5.0, ge=0, description="Quantized recall at most this many points under the merged one."
    )
    min_retention: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Of the general questions the base model answers, the share the fine-tuned "
        "model still answers, at least (judged for the merged model and for the quantized bundle).",
    )
    recall_style: str | None = Field(
        None,
        description="Judge recall on the held-out questions of this style only (null: all).",
    )
    bundle_retention_against: Literal["auto", "base", "quantized_base"] = Field(
        "auto",
        description="What the bundle's general-knowledge retention is judged against: base "
        "(the 16-bit base, min_retention); quantized_base (the base through the bundle's own "
        "W4A16 recipe, min_retention_quantized_base; needs quantized_base: true); auto: "
        "quantized_base when the base's weights were themselves dequantized from a 4-bit file "
        "(the embedded default, a Q4_1 GGUF) and quantized_base is on, else base.",
    )
    min_retention_quantized_base: float = Field(
        0.8,
        ge=0,
        le=1,
        description="The bundle's retention judged against the base in W4A16 (a base that "
        "was itself quantized), at least.",
    )
    min_right_calls: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Tool prompts (`tools`): the fine-tuned model calls the expected function "
        "with the expected arguments on at least this share.",
    )
    max_base_right_calls: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Tool prompts: the base model (served with the same template and parser) "
        "below this share, so the tool calls are the fine-tuning's work.",
    )
    max_right_calls_drop: float = Field(
        5.0, ge=0, description="Tool prompts: the bundle at most this many points below."
    )


class EvalConfig(StrictModel):
    heldout: str | None = Field(
        None,
        description="Held-out questions (JSONL: question, fact and/or answers, answer, id, "
        "style, clause); default: the run's eval_data.",
    )
    general: str | None = Field(
        None,
        description="General-knowledge questions (JSONL: question, answers) for the forgetting "
        "check; null: no retention figures.",
    )
    tools: str | None = Field(
        None,
        description="Held-out tool prompts (JSONL: messages, tools, the expected call or null, "
        "fact) for a run trained on tool calls; null: no tool-call figures.",
    )
    tool_strict_level: ToolStrictLevel = Field(
        DEFAULT_TOOL_STRICT_LEVEL,
        description="How vLLM holds the tool prompts' calls to the declared functions, as "
        "`tuneship serve` does (its default: parameter); auto measures the model alone.",
    )
    max_tokens: int = Field(64, ge=1, description="Reply budget per question (greedy).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="What the merge and the perplexities compute in; auto: the machine's "
        "rule, as for train (bf16 where native, else fp32 on CPU).",
    )
    concurrency: int = Field(16, ge=1, description="Questions in flight per served model.")
    serve_bin: str | None = Field(
        None, description="The serve environment's tuneship (default: .venv/serve/bin/tuneship)."
    )
    shown: int = Field(
        12, ge=0, description="Questions shown side by side in report.md (report.html: all)."
    )
    quantized_base: bool = Field(
        False,
        description="Also quantize the base model with the bundle's own recipe and ask it the "
        "general questions: what 4-bit weights alone cost, told apart from the fine-tuning "
        "(a few minutes more: GPTQ and one more vLLM start-up).",
    )
    quantized_base_scale_tuning: bool = Field(
        False,
        description="With quantized_base, where the bundle's scales were tuned "
        "(scale_tuning_epochs): tune the base's the same way, toward the 16-bit base (as long "
        "again as the bundle's tuning took). Off: the base through GPTQ with the bundle's "
        "scheme, group size, observer and calibration sample, what its 4-bit integers cost.",
    )
    targets: EvalTargets = Field(default_factory=EvalTargets)
