"""The training mix: duplicates, eval split, train/eval leakage, weighted mix.

Everything here is deterministic given the seed, works on validated Conversations and reports
what it did, so `tuneship data check` and run.json say the same thing, and export and eval can
rebuild a run's exact training conversations from its stored settings (a DataMix).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tuneship.chat.records import Conversation, RecordProblem, load_files, stream_file
from tuneship.config.schema import DataMix
from tuneship.infra.errors import DataError, TuneshipError


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def conversation_key(conv: Conversation) -> tuple[Any, ...]:
    turns = tuple(
        (m["role"], _norm(m["content"]), json.dumps(m.get("tool_calls"), sort_keys=True))
        if "tool_calls" in m
        else (m["role"], _norm(m["content"]))
        for m in conv.messages
    )
    return (turns, json.dumps(conv.tools, sort_keys=True)) if conv.tools else turns


def user_turns(conv: Conversation) -> set[str]:
    return {_norm(m["content"]) for m in conv.messages if m["role"] == "user"}


class DuplicateFinder:
    """Exact duplicates (same roles and texts, whitespace and case folded), met one conversation
    at a time; it keeps an 8-byte digest per distinct conversation, not the conversation."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def is_repeat(self, conv: Conversation) -> bool:
        digest = hashlib.blake2b(repr(conversation_key(conv)).encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little")
        repeat = key in self.seen
        self.seen.add(key)
        return repeat


def drop_duplicates(convs: list[Conversation]) -> tuple[list[Conversation], list[str]]:
    """Keep the first of every set of exact duplicates; return the kept ones and the ids of the
    dropped ones."""
    finder = DuplicateFinder()
    kept, dropped = [], []
    for conv in convs:
        (dropped.append(conv.id) if finder.is_repeat(conv) else kept.append(conv))
    return kept, dropped


class LeakFinder:
    """Held-out conversations whose user turn also appears in training (same text), found while
    the training conversations go by one at a time."""

    def __init__(self, held_out: list[Conversation]):
        self.order = {conv.id: i for i, conv in enumerate(held_out)}
        self.by_turn: dict[str, list[str]] = {}
        for conv in held_out:
            for turn in user_turns(conv):
                self.by_turn.setdefault(turn, []).append(conv.id)
        self.first_hit: dict[str, str] = {}  # held-out id -> first training id sharing a turn

    def see(self, conv: Conversation) -> None:
        for turn in user_turns(conv):
            for held_out_id in self.by_turn.get(turn, ()):
                self.first_hit.setdefault(held_out_id, conv.id)

    def found(self) -> list[dict[str, str]]:
        ordered = sorted(self.first_hit, key=self.order.__getitem__)
        return [
            {"eval": held_out_id, "train": self.first_hit[held_out_id]} for held_out_id in ordered
        ]


def leaks(train: list[Conversation], held_out: list[Conversation]) -> list[dict[str, str]]:
    """Held-out conversations whose user turn also appears in training, each with the first
    training conversation that shares one."""
    finder = LeakFinder(held_out)
    for conv in train:
        finder.see(conv)
    return finder.found()


def mix(sources: list[list[int]], weights: list[float], seed: int) -> tuple[list[int], list[int]]:
    """Resample the sources to the given shares of the mix, keeping the total size.

    A source asked for more than it has is repeated whole, then topped up by a seeded sample.
    """
    total = sum(len(s) for s in sources)
    rng = random.Random(seed)
    mixed: list[int] = []
    counts = []
    for items, weight in zip(sources, weights, strict=True):
        want = round(total * weight / sum(weights))
        if want and not items:
            raise TuneshipError("a weighted data source has no conversations left to sample")
        taken = items * (want // len(items)) + rng.sample(items, want % len(items)) if want else []
        mixed += taken
        counts.append(len(taken))
    rng.shuffle(mixed)
    return mixed, counts


def fold(conversations: list[Conversation], system_turns: str) -> list[Conversation]:
    if system_turns != "fold":
        return conversations
    return [c.system_folded() for c in conversations]


@dataclass
class TurnKinds:
    """How many of the conversations used (kept or held out) have a system turn, and one of
    them; how many declare tools or call them, and their calls."""

    system: int = 0
    system_example: str = ""
    tool_conversations: int = 0
    calls: int = 0

    def see(self, conv: Conversation) -> None:
        if conv.has_system:
            self.system += 1
            self.system_example = self.system_example or conv.id
        if conv.tools or conv.calls:
            self.tool_conversations += 1
            self.calls += conv.calls


@dataclass
class MixPlan:
    """Which conversations a run trains and evaluates on, in which order, as numbers: the
    "kept" conversations (valid, not a duplicate, within the limit) are numbered 0, 1, ... in
    source and file order; held-out ones read from eval_data come after them. Made in one pass
    over the files that keeps no conversation (plan()); `kept()` streams them again."""

    cfg: DataMix
    ordinals: list[array]  # per source: the kept conversations' positions among its valid ones
    problems: list[RecordProblem]
    train: list[int]  # kept numbers in training order (weighted sources repeat or sample them)
    pool: list[list[int]]  # per source: its kept numbers left for training, before the mix
    held_out: list[int]  # kept numbers held out by eval_fraction (empty with eval_data)
    eval_data: list[Conversation]  # the eval_data file's conversations
    report: dict[str, Any]
    kinds: TurnKinds

    @property
    def kept_count(self) -> int:
        return sum(len(o) for o in self.ordinals)

    @cached_property
    def starts(self) -> list[int]:
        """Each source's first kept number."""
        return list(itertools.accumulate((len(o) for o in self.ordinals[:-1]), initial=0))

    def source_of(self, kept_number: int) -> int:
        return bisect.bisect_right(self.starts, kept_number) - 1

    def kept(self) -> Iterator[tuple[int, Conversation]]:
        """(kept number, conversation) for every kept conversation, read from the files again."""
        number = 0
        for source, ordinals in zip(self.cfg.data, self.ordinals, strict=True):
            wanted = iter(ordinals)
            next_wanted = next(wanted, None)
            valid = (
                c for c in stream_file(source.path, source.mapping()) if isinstance(c, Conversation)
            )
            for ordinal, conv in enumerate(valid):
                if next_wanted is None:
                    break
                if ordinal == next_wanted:
                    yield number, fold([conv], self.cfg.system_turns)[0]
                    number += 1
                    next_wanted = next(wanted, None)

    def held_out_conversations(self) -> list[Conversation]:
        """The eval set, in its order (from the eval_data file, or read from the training files)."""
        if self.cfg.eval_data:
            return self.eval_data
        wanted = set(self.held_out)
        found = {number: conv for number, conv in self.kept() if number in wanted}
        return [found[number] for number in self.held_out]


def plan(cfg: DataMix) -> MixPlan:
    """Validate, de-duplicate, limit, split off the eval set and mix, streaming the files once."""
    duplicates = DuplicateFinder() if cfg.dedup else None
    kinds = TurnKinds()
    ordinals: list[array] = []
    problems: list[RecordProblem] = []
    dropped: list[str] = []
    dropped_count, room = 0, cfg.limit
    for source in cfg.data:
        kept, found, ordinal = array("q"), [], 0
        for item in stream_file(source.path, source.mapping()):
            if isinstance(item, RecordProblem):
                found.append(item)
                continue
            conv = fold([item], cfg.system_turns)[0]
            if duplicates and duplicates.is_repeat(conv):
                dropped_count += 1
                if len(dropped) < 10:
                    dropped.append(conv.id)
            elif room is None or room > 0:
                kept.append(ordinal)
                kinds.see(conv)
                room = None if room is None else room - 1
            ordinal += 1
        refuse_invalid(found, cfg.skip_invalid, "training data")
        ordinals.append(kept)
        problems += found
    report: dict[str, Any] = {"duplicates_dropped": dropped_count, "duplicate_ids": dropped}

    starts = list(itertools.accumulate((len(o) for o in ordinals), initial=0))
    pool = [list(range(start, start + len(o))) for start, o in zip(starts, ordinals, strict=False)]
    held_out: list[int] = []
    eval_data: list[Conversation] = []
    if cfg.eval_data:
        loaded = load_files([cfg.eval_data])
        refuse_invalid(loaded.problems, cfg.skip_invalid, "eval data")
        eval_data = fold(loaded.conversations, cfg.system_turns)
        for conv in eval_data:
            kinds.see(conv)
    elif cfg.eval_fraction:
        rng = random.Random(cfg.seed)
        split = []
        for numbers in pool:
            order = list(numbers)
            rng.shuffle(order)
            n_eval = max(1, round(len(order) * cfg.eval_fraction)) if order else 0
            held_out += order[:n_eval]
            taken = set(order[:n_eval])
            split.append([n for n in numbers if n not in taken])
        pool = split
    if cfg.has_eval and not (held_out or eval_data):
        raise TuneshipError("the eval set is empty: check eval_data / eval_fraction")
    report["eval"] = {
        "source": cfg.eval_data or (f"{cfg.eval_fraction:.0%} of training" if held_out else None),
        "conversations": len(held_out) + len(eval_data),
    }

    weights = [s.weight for s in cfg.data if s.weight is not None]
    if len(weights) == len(cfg.data):  # every source weighted, or none (the config says so)
        train, counts = mix(pool, weights, cfg.seed)
    else:
        train, counts = [n for numbers in pool for n in numbers], [len(n) for n in pool]
    report["sources"] = [
        {
            "path": source.path,
            "weight": source.weight,
            "distill": source.distill,
            "conversations": len(numbers),
            "in_mix": count,
            "share": round(count / max(1, len(train)), 4),
        }
        for source, numbers, count in zip(cfg.data, pool, counts, strict=True)
    ]
    return MixPlan(cfg, ordinals, problems, train, pool, held_out, eval_data, report, kinds)


def refuse_invalid(problems: list[RecordProblem], skip_invalid: bool, what: str) -> None:
    if problems and not skip_invalid:
        raise DataError(
            f"{len(problems)} invalid record(s) in the {what} "
            "(fix them, or set skip_invalid: true to train without them)",
            [str(p) for p in problems],
        )


@dataclass
class PreparedData:
    train: list[Conversation]
    eval: list[Conversation]
    problems: list[RecordProblem]
    report: dict[str, Any] = field(default_factory=dict)
    distill_ids: set[str] = field(default_factory=set)  # conversations from distill sources


def prepare(cfg: DataMix) -> PreparedData:
    """The plan's conversations in memory, with the leakage report: what export and eval
    rebuild a run's training conversations with (the train stage streams them instead)."""
    mixed = plan(cfg)
    kept = [conv for _, conv in mixed.kept()]
    held_out = mixed.eval_data or [kept[n] for n in mixed.held_out]
    pool = [kept[n] for numbers in mixed.pool for n in numbers]
    leaked = leaks(pool, held_out)
    report = mixed.report
    report["eval"] |= {"leaks": len(leaked), "leak_examples": leaked[:10]}
    distilled = {
        kept[n].id
        for source, numbers in zip(cfg.data, mixed.pool, strict=True)
        if source.distill
        for n in numbers
    }
    return PreparedData(
        train=[kept[n] for n in mixed.train],
        eval=held_out,
        problems=mixed.problems,
        report=report,
        distill_ids=distilled,
    )
