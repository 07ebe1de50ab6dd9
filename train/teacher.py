"""The base model's next-token distribution on the distilled rows, computed once before training.

Distilled rows learn the base model's distribution (distill.py), and the base does not change
while the adapter trains. So the base (the adapter off) runs once over those rows before the
first step, and its `distill_top_k` most likely next tokens at every trained position are kept
with their log-probabilities; the rest of its probability is one bucket (distill.top_k_kl). This
replaces a teacher forward pass in every training step with one pass over the distilled rows,
and a distributed run has no teacher pass to agree on inside a step. The targets are cached in
the run's work folder under a key of the base, the rows, k and the precision, so a resumed run
reuses them; run.json records their sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tuneship.chat.labels import IGNORE, Example

from .examples import pad_collate
from .loss import final_hidden, not_chunkable, one_position

CACHE = "teacher-top-k.safetensors"


@dataclass
class TeacherTargets:
    """Per training row: the teacher's top-k token ids and log-probabilities at each trained
    position ([trained tokens, k]), or None for a row that is not distilled."""

    ids: list[Any]
    logprobs: list[Any]
    top_k: int
    sha256: str
    seconds: float | None  # time to compute them; None when read from the cache

    @property
    def rows(self) -> int:
        return sum(ids is not None for ids in self.ids)

    @property
    def positions(self) -> int:
        return sum(len(ids) for ids in self.ids if ids is not None)


@dataclass(frozen=True)
class TargetSettings:
    """What the targets depend on besides the rows (base: a name for the base model)."""

    base: str
    top_k: int
    precision: str
    pad_id: int
    batch_size: int


def targets_key(
    examples: Sequence[Example], distilled: list[bool], settings: TargetSettings
) -> str:
    digest = hashlib.sha256(
        json.dumps([settings.base, settings.top_k, settings.precision]).encode()
    )
    for example, flag in zip(examples, distilled, strict=True):
        if flag:
            digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()


def teacher_targets(
    model: Any,
    examples: Sequence[Example],
    distilled: list[bool],
    settings: TargetSettings,
    cache_dir: Path,
    write_cache: bool,
) -> TeacherTargets:
    """The targets of the distilled rows: from the cache when its key matches, else computed
    with `model`'s adapter off (and cached when write_cache: rank 0 of a distributed run)."""
    key = targets_key(examples, distilled, settings)
    cache = cache_dir / CACHE
    rows = [i for i, flag in enumerate(distilled) if flag]
    loaded, seconds = read_cache(cache, key, len(rows)), None
    if loaded is None:
        started = time.monotonic()
        ids, logprobs = compute(model, [examples[i] for i in rows], settings)
        if write_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_cache_file(cache, key, ids, logprobs)
        seconds = round(time.monotonic() - started, 1)
    else:
        ids, logprobs = loaded
    by_row_ids: list[Any] = [None] * len(examples)
    by_row_logprobs: list[Any] = [None] * len(examples)
    for row, row_ids, row_logprobs in zip(rows, ids, logprobs, strict=True):
        by_row_ids[row], by_row_logprobs[row] = row_ids, row_logprobs
    sha256 = tensors_sha256(ids, logprobs)
    return TeacherTargets(by_row_ids, by_row_logprobs, settings.top_k, sha256, seconds)


def compute(
    model: Any, examples: list[Example], settings: TargetSettings
) -> tuple[list[Any], list[Any]]:
    """Top-k next-token ids and log-probabilities of the base (adapter off) at the trained
    positions of each example, in batches of similar lengths."""
    causal_lm = model.get_base_model()
    device = next(causal_lm.parameters()).device
    chunkable = not_chunkable(causal_lm) is None
    collate = pad_collate(settings.pad_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    ids: list[Any] = [None] * len(examples)
    logprobs: list[Any] = [None] * len(examples)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    was_training = model.training
    model.eval()
    batches = range(0, len(order), settings.batch_size)
    with torch.no_grad(), model.disable_adapter(), autocast:
        for start in tqdm(batches, desc="teacher targets (the base model, once)", unit="batch"):
            picked = order[start : start + settings.batch_size]
            rows = [
                {"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in picked
            ]
            batch = {key: value.to(device) for key, value in collate(rows).items()}
            labels = batch.pop("labels")
            outputs = last_outputs(causal_lm, batch, chunkable)
            for row, index in enumerate(picked):
                trained = labels[row, 1:] != IGNORE
                log_p = logprobs_of(causal_lm, outputs[row, :-1][trained], chunkable)
                top = log_p.topk(min(settings.top_k, log_p.shape[-1]), dim=-1)  # tiny vocabularies
                ids[index], logprobs[index] = top.indices.to(torch.int32).cpu(), top.values.cpu()
    model.train(was_training)
    return ids, logprobs


def last_outputs(causal_lm: Any, batch: dict, chunkable: bool) -> Any:
    """The final hidden states (the output layer is applied per row, on trained positions
    only), or the logits of a model whose output is more than a linear layer."""
    if not chunkable:
        return causal_lm(**batch).logits
    with final_hidden(causal_lm) as seen:
        causal_lm(**batch, logits_to_keep=one_position(batch["input_ids"].device))
    return seen[-1]


def logprobs_of(causal_lm: Any, outputs: Any, chunkable: bool) -> Any:
    if chunkable:
        weight = causal_lm.get_output_embeddings().weight
        outputs = outputs.to(weight.dtype) @ weight.T
    return outputs.float().log_softmax(-1)


def read_cache(path: Path, key: str, rows: int) -> tuple[list[Any], list[Any]] | None:
    """The cached targets when the file holds this key and row count (else None: recompute)."""
    try:
        with safe_open(str(path), framework="pt") as stored:
            if stored.metadata().get("key") != key:
                return None
            counts = json.loads(stored.metadata()["counts"])
            ids, logprobs = stored.get_tensor("ids"), stored.get_tensor("logprobs")
    except (OSError, KeyError, ValueError, SafetensorError):
        return None  # absent, or cut short by a crash: recompute
    if len(counts) != rows or sum(counts) != len(ids):
        return None
    return list(ids.split(counts)), list(logprobs.split(counts))


def write_cache_file(path: Path, key: str, ids: list[Any], logprobs: list[Any]) -> None:
    counts = [len(row) for row in ids]
    partial = path.with_name(path.name + ".partial")
    save_file(
        {"ids": torch.cat(ids).contiguous(), "logprobs": torch.cat(logprobs).contiguous()},
        str(partial),
        metadata={"key": key, "counts": json.dumps(counts)},
    )
    partial.replace(path)


def tensors_sha256(ids: list[Any], logprobs: list[Any]) -> str:
    digest = hashlib.sha256()
    for tensor in (*ids, *logprobs):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
