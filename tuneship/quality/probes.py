"""Quality probes shared by export (its checks) and eval (its report).

- held-out questions (`EvalItem`): loaded from JSONL, or sampled from the training data;
- the vLLM probe: `tuneship bundle probe` in the serve environment serves a model folder with
  the production arguments and records what it answers (`ProbeRequest` in, `ProbeResult` out:
  the typed hand-off between the two environments);
- scoring: fact recall (answered), clause citation (cited), perplexity on reference replies.

Importing this module loads no heavy library; perplexity imports torch when it runs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tuneship.chat.records import Conversation
from tuneship.infra.engine_log import root_cause
from tuneship.infra.errors import ProblemsError, TuneshipError
from tuneship.quality.facts import cites_clause, contains_fact

if TYPE_CHECKING:
    import torch

    from tuneship.chat.labels import ChatTokenizer

SERVING_LEN_CAP = 4096


@dataclass(frozen=True)
class EvalItem:
    id: str
    messages: tuple[dict[str, str], ...]  # the prompt: everything before the reply
    answer: str | None  # reference reply (perplexity), if known
    fact: str | None  # key fact the reply must contain (recall), if known
    accepted: tuple[str, ...] = ()  # other accepted facts ("answers": general questions)
    style: str | None = None  # a label to break recall down by (e.g. reworded, paraphrase)
    clause: str | None = None  # the clause id a reply should cite ("T-4.2"), if any

    @property
    def facts(self) -> tuple[str, ...]:
        return ((self.fact,) if self.fact else ()) + self.accepted


def load_eval_items(path: Path) -> list[EvalItem]:
    """Held-out questions: JSONL rows {"question", "fact"?, "answers"?, "answer"?, "id"?,
    "style"?, "clause"?}: `fact` (or any of `answers`) is what a correct reply must contain,
    `answer` a reference reply for perplexity, `clause` the id of the rule it should cite."""
    items, problems = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(_item(row, f"{Path(path).name}:{lineno}"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}:line {lineno}: {exc}")
    if problems or not items:
        raise ProblemsError(
            f"eval_data {path} is not a held-out question file:", problems or ["no questions"]
        )
    return items


def _item(row: dict, default_id: str) -> EvalItem:
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    for key in ("fact", "answer", "id", "style", "clause"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"'{key}' must be a string")
    if row.get("clause") is not None and not row["clause"].strip():
        raise ValueError("'clause' must be a non-empty string")
    accepted = row.get("answers", [])
    if not isinstance(accepted, list) or not all(
        isinstance(a, str) and a.strip() for a in accepted
    ):
        raise ValueError("'answers' must be a list of non-empty strings")
    return EvalItem(
        str(row.get("id", default_id)),
        ({"role": "user", "content": question},),
        row.get("answer"),
        row.get("fact"),
        tuple(accepted),
        row.get("style"),
        row.get("clause"),
    )


def items_from_training(conversations: list[Conversation], count: int, seed: int) -> list[EvalItem]:
    """Fallback when no eval_data is given: the last reply of sampled training conversations,
    plain chats where there are any (the checks send no tools; calls have a gate of their own)."""
    plain = [c for c in conversations if not (c.tools or c.calls)] or conversations
    picked = random.Random(seed).sample(plain, min(count, len(plain)))
    items = []
    for conv in picked:
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        items.append(EvalItem(conv.id, conv.messages[:last], conv.messages[last]["content"], None))
    return items


def answered(item: EvalItem, text: str | None) -> bool:
    """The reply contains the key fact (or one of the accepted answers)."""
    return any(contains_fact(text or "", fact) for fact in item.facts)


def cited(item: EvalItem, text: str | None) -> bool | None:
    """The reply names the clause the question is about; None when the item has no clause."""
    return cites_clause(text or "", item.clause) if item.clause else None


def fact_recall(items: list[EvalItem], texts: list[str | None]) -> float | None:
    """Share of the items with a fact whose reply contains it; None when no item has one."""
    scored = [(i, t) for i, t in zip(items, texts, strict=True) if i.facts]
    if not scored:
        return None
    return sum(answered(i, t) for i, t in scored) / len(scored)


# --- the vLLM probe: the hand-off between the train and the serve environment ---------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ProbeChat(_Wire):
    id: str
    messages: list[dict[str, Any]]
    model: str | None = Field(None, description="Served name (an adapter); default: the model.")
    tools: list[dict[str, Any]] | None = Field(None, description="Functions it may call.")


class ProbeRequest(_Wire):
    served_name: str | None = None  # the model's name in vLLM (default: "preflight")
    max_model_len: int
    max_tokens: int
    concurrency: int = 16
    extra_args: list[str] = []
    tokenize: list[list[dict[str, Any]]] = Field(
        default_factory=list, description="Prompts whose vLLM token ids are recorded."
    )
    tool_tokenize: list[ProbeChat] = Field(
        default_factory=list, description="Prompts with tools whose token ids are recorded."
    )
    chats: list[ProbeChat] = []

    @classmethod
    def asking(
        cls, items: list[EvalItem], model_dir: Path, max_tokens: int, **more: Any
    ) -> ProbeRequest:
        chats = [ProbeChat(id=i.id, messages=list(i.messages)) for i in items]
        return cls(
            max_model_len=serving_max_len(model_dir), max_tokens=max_tokens, chats=chats, **more
        )


class ProbeAnswer(_Wire):
    id: str
    model: str
    text: str | None
    finish_reason: str | None
    completion_tokens: int | None = None
    latency_s: float
    tool_calls: list[dict[str, str]] = Field(
        default_factory=list, description="The calls vLLM's tool parser read: name, arguments."
    )


class ProbeResult(_Wire):
    flavour: str
    served_as: str | None = None  # vLLM's dtype and weights, in words (serve/weights.py)
    argv: list[str]
    load_s: float
    peak_rss_bytes: int
    chat_s: float
    tokenize: list[list[int]] = []
    tool_tokenize: list[list[int]] = []
    chats: list[ProbeAnswer] = []

    @property
    def texts(self) -> list[str | None]:
        return [c.text for c in self.chats]


def find_serve_bin(
    explicit: str | None,
    hint: str = "set checks=false to export without them (the bundle then records them as skipped)",
) -> Path:
    """The serve environment's `tuneship`, which runs vLLM for the checks and the evaluation."""
    candidates = [explicit, os.environ.get("TUNESHIP_SERVE_BIN"), ".venv/serve/bin/tuneship"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise TuneshipError(
        "vLLM runs in the serve environment: this needs its `tuneship` (looked at the "
        "serve_bin setting, $TUNESHIP_SERVE_BIN and .venv/serve/bin/tuneship); set one of them "
        f"(`make envs` builds .venv/serve), or {hint}"
    )


def probe(
    serve_bin: Path, model_dir: Path, work: Path, name: str, request: ProbeRequest
) -> ProbeResult:
    """Run `tuneship bundle probe` in the serve environment; return what vLLM answered."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"{name}.in.json", work / f"{name}.out.json"
    spec_path.write_text(request.model_dump_json(), encoding="utf-8")
    argv = [str(serve_bin), "bundle", "probe", str(model_dir)]
    argv += ["--input", str(spec_path), "--output", str(out_path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        log = out_path.with_suffix(".log")
        raise TuneshipError(probe_failure(model_dir, name, proc.stderr, log))
    return ProbeResult.model_validate_json(out_path.read_text(encoding="utf-8"))


def probe_failure(model_dir: Path, name: str, stderr: str, log: Path) -> str:
    """Why `bundle probe` failed, in a few lines: its own error (`error: ...`) or the first
    exception of vLLM's log, and where the whole log is kept (the work folder holding it is
    removed with the failed output)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    said = [line for line in stderr.splitlines() if line.startswith("error:")]
    cause = said[-1] if said else root_cause(lines) or root_cause(stderr.splitlines())
    kept = Path(tempfile.gettempdir()) / f"tuneship-{name}-vllm-{int(time.time())}.log"
    if lines:
        shutil.copy(log, kept)
    where = f"vLLM's whole log: {kept}" if lines else f"stderr:\n{stderr.strip()[-1500:]}"
    return f"vLLM could not serve {model_dir} ({name}): {cause or 'no error found'}\n{where}"


def serving_max_len(model_dir: Path, cap: int = SERVING_LEN_CAP) -> int:
    """Context length served by default: the model's, capped to keep the KV cache small."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(int(config.get("max_position_embeddings", 2048)), cap)


def perplexity(
    model_dir: Path,
    chat_tokenizer: ChatTokenizer,
    items: list[EvalItem],
    dtype: torch.dtype,
    batch_size: int = 16,
) -> float | None:
    """exp(mean loss) over the reference replies' tokens (assistant tokens only), computed in
    `dtype` (the compute precision); None when the held-out data has no reference replies.
    Replies of similar length are batched, padded on the right (padding changes no real
    token's logits under the attention mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    examples = [
        chat_tokenizer(Conversation(item.id, "openai", (*item.messages, reply)))
        for item in items
        if item.answer
        for reply in [{"role": "assistant", "content": item.answer}]
    ]
    if not examples:
        return None
    examples.sort(key=lambda e: len(e.input_ids))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        mask = torch.tensor(
            [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
        )
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        count += int((labels[:, 1:] != -100).sum())
    if not count:
        raise TuneshipError("no reference replies to measure perplexity on")
    return math.exp(total / count)
