"""Distributed plumbing, in one process with the process group faked: the data is tokenized by
rank 0 only and read by the others, and distributed.timeout_s reaches the process group."""

from __future__ import annotations

from datetime import timedelta

import pytest
from transformers import AutoTokenizer

from tests.support import train_config
from tuneship.train import run as train_run
from tuneship.train import tokenized
from tuneship.train.observe import Reporter
from tuneship.train.trainer import Context, training_arguments


@pytest.fixture
def group(monkeypatch) -> dict:
    """A process group that is never there: what init_process_group was given."""
    given: dict = {}
    monkeypatch.setattr(train_run.dist, "is_initialized", lambda: bool(given))
    monkeypatch.setattr(
        train_run.dist, "init_process_group", lambda backend, **kw: given.update(kw, b=backend)
    )
    monkeypatch.setattr(train_run.dist, "barrier", lambda: None)
    return given


def test_rank_0_tokenizes_and_the_other_ranks_read_its_rows(
    tmp_path, tiny_base, small_dataset, group, monkeypatch, capsys
):
    cfg = train_config(tmp_path, tiny_base, small_dataset, distributed={"timeout_s": 90})
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    reporter, work = Reporter("json", is_main=False), tmp_path / "runs" / "t.work"

    first = train_run.shared_data(cfg, tokenizer, reporter, work, rank=0, world=2)
    assert group["timeout"] == timedelta(seconds=90)  # distributed.timeout_s, not torch's 30 min
    assert [p.name for p in work.glob("tokenized-*.pkl")] == [
        tokenized.cache_path(work, tokenized.cache_key(cfg, tokenizer)).name
    ]

    tokenizes = []
    real = train_run.prepare_data
    monkeypatch.setattr(train_run, "prepare_data", lambda *a: tokenizes.append(1) or real(*a))
    second = train_run.shared_data(cfg, tokenizer, reporter, work, rank=1, world=2)
    assert tokenizes == [] and second == first
    assert len(second.rows.train) > 0

    # data that differs on this rank's node: another hash, no file, so it tokenizes itself
    lines = small_dataset.read_text(encoding="utf-8").splitlines(keepends=True)
    small_dataset.write_text("".join(lines[:-1]), encoding="utf-8")
    third = train_run.shared_data(cfg, tokenizer, reporter, work, rank=1, world=2)
    assert tokenizes == [1] and third != first
    assert "tokenizing here" in capsys.readouterr().err


def test_the_cache_key_follows_settings_data_and_tokenizer(tmp_path, tiny_base, small_dataset):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    cfg = train_config(tmp_path, tiny_base, small_dataset)
    key = tokenized.cache_key(cfg, tokenizer)
    assert tokenized.cache_key(cfg.model_copy(update={"log_format": "json"}), tokenizer) == key
    assert tokenized.cache_key(cfg.model_copy(update={"max_length": 64}), tokenizer) != key
    tokenizer.chat_template = tokenizer.chat_template.replace("test assistant", "assistant")
    assert tokenized.cache_key(cfg, tokenizer) != key


def test_the_trainer_gets_the_timeout_too(tmp_path, tiny_base, small_dataset):
    """Where the Trainer (accelerate) starts the process group itself."""
    cfg = train_config(tmp_path, tiny_base, small_dataset, distributed={"timeout_s": 90})
    ctx = Context(cfg, tmp_path / "work", 1, Reporter("json", is_main=True))
    assert training_arguments(ctx, "fp32", model=None).ddp_timeout == 90
