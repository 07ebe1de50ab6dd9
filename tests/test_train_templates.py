"""What a base's chat template can serve is checked before training (tuneship/chat/template.py):
no template, a template that refuses or drops system turns, an end of turn that is not the eos
the model stops on."""

from __future__ import annotations

import pytest

from tests.families import FAMILIES, GEMMA2, GEMMA3, build_family_base
from tests.support import CHATML, build_tokenizer, sharegpt, train_config, write_jsonl
from tuneship.chat.template import align_eos, end_of_turn, system_turns
from tuneship.infra.errors import TuneshipError
from tuneship.train.run import run as train

DROPS_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "handling"),
    [(CHATML, "rendered"), (GEMMA3, "rendered"), (GEMMA2, "refused"), (DROPS_SYSTEM, "dropped")],
)
def test_what_a_template_does_with_a_system_turn(template, handling):
    extra = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = build_tokenizer(template, "<|im_end|>", "<bos>", extra)
    assert system_turns(tokenizer) == handling


@pytest.fixture(scope="module")
def gemma2_base(tmp_path_factory):
    family = next(f for f in FAMILIES if f.name == "gemma2")
    return build_family_base(family, tmp_path_factory.mktemp("gemma2"))


def with_system(tmp_path):
    rows = [sharegpt(("system", "Be brief."), ("human", f"Policy {i}?"), ("gpt", f"${i}."))
            for i in range(8)]  # fmt: skip
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_system_turns_a_template_refuses_are_refused_before_training(tmp_path, gemma2_base):
    with pytest.raises(TuneshipError) as refused:
        train(train_config(tmp_path, gemma2_base, with_system(tmp_path), max_steps=1))
    message = str(refused.value)
    assert "chat template refused system turns, and 8 conversation(s) have one" in message
    assert "system_turns: fold" in message
    assert not (tmp_path / "runs" / "t").exists()


def test_folded_system_turns_train_on_a_template_without_a_system_role(tmp_path, gemma2_base):
    from tuneship.handoff.manifest import read_run
    from tuneship.handoff.runs import training_conversations

    cfg = train_config(tmp_path, gemma2_base, with_system(tmp_path), max_steps=1,
                       system_turns="fold")  # fmt: skip
    run = read_run(train(cfg))
    first = training_conversations(run)[0].messages[0]
    assert first["role"] == "user" and first["content"].startswith("Be brief.\n\n")


def test_gemma2s_end_of_turn_is_made_the_eos_the_model_stops_on(gemma2_base):
    """Gemma 2's tokenizer says <eos>, its template ends a turn with <end_of_turn>: a model
    served as it is would never stop. The alignment every stage applies fixes it."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gemma2_base)
    assert tokenizer.eos_token == "<eos>"
    eot_text, eot_id = end_of_turn(tokenizer)
    assert eot_text == "<end_of_turn>"
    generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    assert align_eos(tokenizer, None, generation) == eot_id
    assert tokenizer.eos_token == "<end_of_turn>" and eot_id in [generation.eos_token_id]


def test_a_base_without_a_chat_template_is_refused_before_training(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(TuneshipError, match="no chat template; pick a chat/instruct base"):
        end_of_turn(tokenizer)
