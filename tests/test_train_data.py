"""Data mixing and hygiene: weighted sources, duplicates, eval split, leakage, early stopping."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import TUNESHIP, sharegpt, train_config, write_jsonl
from tuneship.chat.mixing import prepare
from tuneship.chat.records import load_file
from tuneship.config.schema import TrainConfig
from tuneship.handoff.manifest import read_run
from tuneship.infra.errors import ConfigError
from tuneship.train.run import run


def qa(i: int, topic: str = "policy") -> dict:
    return sharegpt(("human", f"What is {topic} {i}?"), ("gpt", f"{topic} {i} says ${i}."))


def with_data(cfg: TrainConfig, files: list, **overrides) -> TrainConfig:
    return TrainConfig(**(cfg.model_dump() | {"data": [str(f) for f in files]} | overrides))


@pytest.fixture
def two_sources(tmp_path):
    domain = write_jsonl(tmp_path / "domain.jsonl", [qa(i) for i in range(12)])
    general = write_jsonl(tmp_path / "general.jsonl", [qa(i, "fact") for i in range(4)])
    return domain, general


def test_weighted_sources_are_mixed_to_their_shares_deterministically(tmp_path, two_sources):
    domain, general = two_sources
    data = [{"path": str(domain), "weight": 7}, {"path": str(general), "weight": 3}]
    cfg = TrainConfig(name="m", data=data, seed=1)
    mixed = prepare(cfg.data_mix())
    shares = {s["path"]: (s["in_mix"], s["share"]) for s in mixed.report["sources"]}
    assert shares == {str(domain): (11, 0.6875), str(general): (5, 0.3125)}
    from_general = [c for c in mixed.train if "general" in c.id]
    # 4 general conversations asked for 5 places: all of them, one twice
    assert len(from_general) == 5 and len({c.id for c in from_general}) == 4
    assert [c.id for c in prepare(cfg.data_mix()).train] == [c.id for c in mixed.train]
    other_seed = prepare(cfg.model_copy(update={"seed": 2}).data_mix())
    assert [c.id for c in other_seed.train] != [c.id for c in mixed.train]
    unweighted = prepare(TrainConfig(name="m", data=[str(domain), str(general)]).data_mix())
    assert len(unweighted.train) == 16 and unweighted.report["sources"][1]["in_mix"] == 4


def test_conversations_of_distill_sources_are_marked_through_the_mix(two_sources):
    domain, general = two_sources
    data = [
        {"path": str(domain), "weight": 7},
        {"path": str(general), "weight": 3, "distill": True},
    ]
    mixed = prepare(TrainConfig(name="m", data=data, seed=1, eval_fraction=0.25).data_mix())
    marked = {c.id for c in mixed.train if c.id in mixed.distill_ids}
    assert marked and marked == {c.id for c in mixed.train if "general" in c.id}
    assert not mixed.distill_ids & {c.id for c in mixed.eval}  # held out: not trained at all
    assert [s["distill"] for s in mixed.report["sources"]] == [False, True]
    assert (
        prepare(TrainConfig(name="m", data=[str(domain), str(general)]).data_mix()).distill_ids
        == set()
    )


def test_the_rows_training_streams_are_the_conversations_export_rebuilds(
    tmp_path, tiny_base, two_sources
):
    """The train stage tokenizes from the plan (numbers, files read again: rows.py); export and
    eval rebuild the same mix in memory (prepare): same conversations, order, eval set, leaks
    and distill marks, with duplicates, a limit, weights and a seeded split all at work."""
    from transformers import AutoTokenizer

    from tuneship.train.observe import Reporter
    from tuneship.train.run import prepare_data

    domain, general = two_sources
    again = write_jsonl(tmp_path / "again.jsonl", [qa(3), qa(2, "fact"), qa(50), qa(51)])
    data = [
        {"path": str(domain), "weight": 6},
        {"path": str(again), "weight": 1},
        {"path": str(general), "weight": 3, "distill": True},
    ]
    cfg = with_data(train_config(tmp_path, tiny_base, domain), [], data=data, seed=5,
                    eval_fraction=0.2, limit=17)  # fmt: skip
    in_memory = prepare(cfg.data_mix())
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    streamed = prepare_data(cfg, tokenizer, Reporter("json", is_main=False), tmp_path / "work")

    assert [e.id for e in streamed.rows.train] == [c.id for c in in_memory.train]
    assert [e.id for e in streamed.rows.eval] == [c.id for c in in_memory.eval]
    assert streamed.rows.distilled == [c.id in in_memory.distill_ids for c in in_memory.train]
    assert any(streamed.rows.distilled)
    stats = streamed.stats
    assert stats.duplicates_dropped == in_memory.report["duplicates_dropped"] == 2
    assert stats.eval.leaks == in_memory.report["eval"]["leaks"]
    assert stats.sources[2].in_mix == in_memory.report["sources"][2]["in_mix"]
    example = streamed.rows.train[0]  # the file's row is what tokenizing the conversation gives
    from tuneship.chat.labels import ChatTokenizer

    assert example == ChatTokenizer(tokenizer)(in_memory.train[0])
    assert stats.tokens == sum(len(e.input_ids) for e in streamed.rows.train)


def test_data_check_counts_every_problem_and_lists_the_first_ones(tmp_path):
    from tuneship.train.datacheck import MAX_LISTED

    bad = MAX_LISTED + 50
    path = write_jsonl(tmp_path / "d.jsonl", [qa(1)] + [{"messages": []}] * bad)
    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(path), "--no-tokens"], capture_output=True, text=True
    )
    assert checked.returncode == 3
    assert f"records: {bad + 1} (1 valid, {bad} invalid)" in checked.stdout
    assert f"invalid records ({bad}):" in checked.stdout
    assert checked.stdout.count("'messages' is empty") == MAX_LISTED
    assert "  ... and 50 more" in checked.stdout


def test_weights_must_be_given_for_all_sources_or_none(two_sources):
    domain, general = two_sources
    with pytest.raises(ValueError, match="give every source a weight, or none"):
        TrainConfig(name="m", data=[{"path": str(domain), "weight": 7}, str(general)])


def test_exact_duplicates_are_dropped_across_files_and_reported(tmp_path, two_sources):
    domain, _ = two_sources
    again = write_jsonl(
        tmp_path / "again.jsonl",
        [qa(3), sharegpt(("human", "what IS  policy 5?"), ("gpt", "Policy 5 says $5.")), qa(99)],
    )
    data = prepare(TrainConfig(name="d", data=[str(domain), str(again)]).data_mix())
    assert data.report["duplicates_dropped"] == 2
    assert data.report["duplicate_ids"] == ["again.jsonl:1", "again.jsonl:2"]
    assert len(data.train) == 13
    kept = prepare(TrainConfig(name="d", data=[str(domain), str(again)], dedup=False).data_mix())
    assert len(kept.train) == 15

    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(domain), str(again), "--no-tokens", "--json"],
        capture_output=True,
        text=True,
    )
    assert json.loads(checked.stdout)["duplicates"]["count"] == 2


def test_eval_split_is_seeded_disjoint_and_leakage_is_reported(tmp_path, two_sources):
    domain, general = two_sources
    cfg = TrainConfig(name="e", data=[str(domain), str(general)], eval_fraction=0.25, seed=3)
    split = prepare(cfg.data_mix())
    assert len(split.eval) == 4 and len(split.train) == 12  # 3 of 12 and 1 of 4
    assert not {c.id for c in split.eval} & {c.id for c in split.train}
    assert [c.id for c in prepare(cfg.data_mix()).eval] == [c.id for c in split.eval]
    assert split.report["eval"]["leaks"] == 0

    # a held-out file (question/answer records) that repeats a training question
    heldout = write_jsonl(
        tmp_path / "heldout.jsonl",
        [
            {"question": "What is policy 4?", "answer": "It says $4."},
            {"question": "What is policy 40?", "answer": "It says $40."},
        ],
    )
    assert load_file(heldout).formats["qa"] == 2
    leaky = prepare(TrainConfig(name="e", data=[str(domain)], eval_data=str(heldout)).data_mix())
    assert leaky.report["eval"]["leaks"] == 1
    assert leaky.report["eval"]["leak_examples"] == [
        {"eval": "heldout.jsonl:1", "train": "domain.jsonl:5"}
    ]
    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(domain), "--eval", str(heldout), "--no-tokens"],
        capture_output=True,
        text=True,
    )
    assert "2 conversations, 1 share a user turn with training" in checked.stdout
    assert "leak: heldout.jsonl:1 = domain.jsonl:5" in checked.stdout


def test_eval_loss_is_logged_and_recorded_with_the_leak_report(tmp_path, tiny_base, two_sources):
    domain, general = two_sources
    out = run(
        with_data(
            train_config(tmp_path, tiny_base, domain), [domain, general],
            eval_fraction=0.25, eval_steps=2, max_steps=6,
        )
    )  # fmt: skip
    manifest = read_run(out)
    assert [step for step, _ in manifest.metrics.eval_loss] == [2, 4, 6]
    assert manifest.examples.eval.used == 4
    assert manifest.examples.eval.leaks == 0
    assert manifest.examples.duplicates_dropped == 0
    assert manifest.metrics.best.best_step in (2, 4, 6)


def test_early_stopping_keeps_the_adapter_with_the_best_eval_loss(tmp_path, tiny_base, two_sources):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneship.chat.labels import ChatTokenizer
    from tuneship.chat.mixing import prepare as prepare_data
    from tuneship.train.examples import pad_collate

    domain, general = two_sources
    # a learning rate far too high: the eval loss soon rises, and patience 2 stops the run
    cfg = with_data(
        train_config(tmp_path, tiny_base, domain), [domain], eval_data=str(general),
        eval_steps=1, early_stopping_patience=2, max_steps=60, learning_rate=0.3,
        checkpoint_steps=None,
    )  # fmt: skip
    manifest = read_run(run(cfg))
    best = manifest.metrics.best
    assert best.stopped_early and best.restored
    assert manifest.metrics.steps == best.best_step + 2 < 60
    evals = dict(manifest.metrics.eval_loss)
    assert evals[best.best_step] == min(evals.values())

    # the adapter written is the best one: its eval loss is the best, not the last
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "runs" / "t" / "adapter"
    )
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in map(ChatTokenizer(tokenizer), prepare_data(cfg.data_mix()).eval)
    ]
    with torch.no_grad():
        loss = model(**pad_collate(tokenizer.pad_token_id)(rows)).loss.item()
    assert abs(loss - best.best_eval_loss) < 1e-3
    assert abs(loss - evals[manifest.metrics.steps]) > 1e-3


def test_config_rejects_contradictory_eval_settings():
    with pytest.raises(ConfigError, match="early_stopping_patience and keep_best need eval_data"):
        from tuneship.config.loading import load_config

        load_config(TrainConfig, None, {"name": "x", "data": ["a"], "early_stopping_patience": 2})


def test_batches_group_rows_of_a_rare_length_together():
    """10 tool sessions of ~960 tokens among 30 chats of ~70, batches of 8: the sessions fill one
    batch and share at most one more with chats (transformers' grouping within random groups
    mixes them into several, each chat padded to 960). Every row once an epoch, the longest
    batch first, and another order the next epoch."""
    import torch

    from tuneship.train.examples import SortedBatches

    lengths = [960 + i for i in range(10)] + [70 + i % 5 for i in range(33)]
    torch.manual_seed(0)
    sampler = SortedBatches(lengths, 8)
    epochs = [list(sampler), list(sampler)]
    for order in epochs:
        assert sorted(order) == list(range(43))
        batches = [order[i : i + 8] for i in range(0, 43, 8)]  # as the DataLoader cuts them
        assert max(lengths) in [lengths[i] for i in batches[0]]
        mixed = [b for b in batches if {lengths[i] > 500 for i in b} == {True, False}]
        assert len(mixed) <= 1
        # the 3 rows left over are the shortest, last: every batch before them is contiguous
        assert sorted(lengths[i] for i in batches[-1]) == sorted(lengths)[:3]
    assert epochs[0] != epochs[1]
    assert list(SortedBatches([], 8)) == []


def test_sorted_batching_trains_on_sorted_batches(tmp_path, tiny_base, small_dataset, monkeypatch):
    """batching: sorted hands the Trainer SortedBatches (group_by_length: transformers' own)."""
    from tuneship.train import examples

    drawn = []
    original = examples.SortedBatches.__iter__

    def counted(self):
        drawn.append(len(self))
        return original(self)

    monkeypatch.setattr(examples.SortedBatches, "__iter__", counted)
    for batching in ("group_by_length", "sorted"):
        run(train_config(tmp_path, tiny_base, small_dataset, name=batching, batching=batching))
        assert bool(drawn) == (batching == "sorted"), batching
