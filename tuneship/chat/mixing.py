"""The training mix: duplicates, eval split, train/eval leakage, weighted mix.

Everything here is deterministic given the seed, works on validated Conversations and reports
what it did, so `tuneship data check` and run.json say the same thing, and export and eval can
rebuild a run's exact training conversations from its stored settings (a DataMix).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from tuneship.chat.records import (
    NO_MAPPING,
    Conversation,
    LoadResult,
    RecordMapping,
    RecordProblem,
    load_files,
)
from tuneship.config.schema import DataMix
from tuneship.infra.errors import DataError, TuneshipError


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def conversation_key(conv: Conversation) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], _norm(m["content"])) for m in conv.messages)


def user_turns(conv: Conversation) -> set[str]:
    return {_norm(m["content"]) for m in conv.messages if m["role"] == "user"}


def drop_duplicates(convs: list[Conversation]) -> tuple[list[Conversation], list[str]]:
    """Keep the first of every set of exact duplicates (same roles and texts, whitespace and
    case folded); return the kept ones and the ids of the dropped ones."""
    seen: set[tuple] = set()
    kept, dropped = [], []
    for conv in convs:
        key = conversation_key(conv)
        (dropped.append(conv.id) if key in seen else kept.append(conv))
        seen.add(key)
    return kept, dropped


def leaks(train: list[Conversation], held_out: list[Conversation]) -> list[dict[str, str]]:
    """Held-out conversations whose user turn also appears in training (same text)."""
    first_seen: dict[str, str] = {}
    for conv in train:
        for turn in user_turns(conv):
            first_seen.setdefault(turn, conv.id)
    found = []
    for conv in held_out:
        hit = next((first_seen[t] for t in sorted(user_turns(conv)) if t in first_seen), None)
        if hit:
            found.append({"eval": conv.id, "train": hit})
    return found


def mix(
    sources: list[list[Conversation]], weights: list[float], seed: int
) -> tuple[list[Conversation], list[int]]:
    """Resample the sources to the given shares of the mix, keeping the total size.

    A source asked for more than it has is repeated whole, then topped up by a seeded sample.
    """
    total = sum(len(s) for s in sources)
    rng = random.Random(seed)
    mixed, counts = [], []
    for convs, weight in zip(sources, weights, strict=True):
        want = round(total * weight / sum(weights))
        if want and not convs:
            raise TuneshipError("a weighted data source has no conversations left to sample")
        taken = convs * (want // len(convs)) + rng.sample(convs, want % len(convs)) if want else []
        mixed += taken
        counts.append(len(taken))
    rng.shuffle(mixed)
    return mixed, counts


@dataclass
class PreparedData:
    train: list[Conversation]
    eval: list[Conversation]
    problems: list[RecordProblem]
    report: dict[str, Any] = field(default_factory=dict)
    distill_ids: set[str] = field(default_factory=set)  # conversations from distill sources


def _load(
    paths: list[str], skip_invalid: bool, what: str, mapping: RecordMapping = NO_MAPPING
) -> LoadResult:
    loaded = load_files(paths, mapping)
    if loaded.problems and not skip_invalid:
        raise DataError(
            f"{len(loaded.problems)} invalid record(s) in the {what} "
            "(fix them, or set skip_invalid: true to train without them)",
            [str(p) for p in loaded.problems],
        )
    return loaded


def fold(conversations: list[Conversation], system_turns: str) -> list[Conversation]:
    if system_turns != "fold":
        return conversations
    return [c.system_folded() for c in conversations]


def prepare(cfg: DataMix) -> PreparedData:
    """Load, validate, de-duplicate, split off the eval set, check leakage and mix."""
    per_source, problems = [], []
    for source in cfg.data:
        loaded = _load([source.path], cfg.skip_invalid, "training data", source.mapping())
        per_source.append(fold(loaded.conversations, cfg.system_turns))
        problems += loaded.problems
    report: dict[str, Any] = {"duplicates_dropped": 0, "duplicate_ids": []}
    if cfg.dedup:
        # one pass over all sources in order: a conversation repeated in a later file goes too
        kept, dropped = drop_duplicates([c for convs in per_source for c in convs])
        kept_ids = {c.id for c in kept}
        per_source = [[c for c in convs if c.id in kept_ids] for convs in per_source]
        report = {"duplicates_dropped": len(dropped), "duplicate_ids": dropped[:10]}

    if cfg.limit:
        room, limited = cfg.limit, []
        for convs in per_source:
            limited.append(convs[:room])
            room -= len(limited[-1])
        per_source = limited

    held_out: list[Conversation] = []
    if cfg.eval_data:
        held_out = fold(
            _load([cfg.eval_data], cfg.skip_invalid, "eval data").conversations, cfg.system_turns
        )
    elif cfg.eval_fraction:
        rng = random.Random(cfg.seed)
        split = []
        for convs in per_source:
            order = list(convs)
            rng.shuffle(order)
            n_eval = max(1, round(len(order) * cfg.eval_fraction)) if order else 0
            held_out += order[:n_eval]
            eval_ids = {c.id for c in order[:n_eval]}
            split.append([c for c in convs if c.id not in eval_ids])
        per_source = split
    if cfg.has_eval and not held_out:
        raise TuneshipError("the eval set is empty: check eval_data / eval_fraction")

    pool = [c for convs in per_source for c in convs]
    distill_ids = {
        c.id
        for source, convs in zip(cfg.data, per_source, strict=True)
        if source.distill
        for c in convs
    }
    leaked = leaks(pool, held_out)
    report["eval"] = {
        "source": cfg.eval_data or (f"{cfg.eval_fraction:.0%} of training" if held_out else None),
        "conversations": len(held_out),
        "leaks": len(leaked),
        "leak_examples": leaked[:10],
    }
    weights = [s.weight for s in cfg.data if s.weight is not None]
    if len(weights) == len(cfg.data):  # every source weighted, or none (the config says so)
        train, counts = mix(per_source, weights, cfg.seed)
    else:
        train, counts = pool, [len(c) for c in per_source]
    report["sources"] = [
        {
            "path": source.path,
            "weight": source.weight,
            "distill": source.distill,
            "conversations": len(convs),
            "in_mix": count,
            "share": round(count / max(1, len(train)), 4),
        }
        for source, convs, count in zip(cfg.data, per_source, counts, strict=True)
    ]
    return PreparedData(
        train=train, eval=held_out, problems=problems, report=report, distill_ids=distill_ids
    )
