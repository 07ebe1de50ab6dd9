"""Chat-template rendering and assistant-only labels (train stage)."""

from __future__ import annotations

import pytest

from tests.support import LLAMA3, build_tokenizer
from tuneship.chat.labels import IGNORE, ChatTokenizer
from tuneship.chat.records import Conversation
from tuneship.chat.template import align_eos, end_of_turn
from tuneship.infra.errors import TuneshipError

MULTI_TURN = Conversation(
    "t:1",
    "openai",
    (
        {"role": "user", "content": "What is the meal allowance?"},
        {"role": "assistant", "content": "Under Policy T-4.2 it is $62."},
        {"role": "user", "content": "国内出差呢?"},
        {"role": "assistant", "content": "根据政策 T-4.2,每日餐费补贴为 $62。"},
    ),
)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE]
    )


def test_trained_positions_are_exactly_the_replies_and_end_of_turn(chatml_tokenizer):
    example = ChatTokenizer(chatml_tokenizer)(MULTI_TURN)
    assert trained_text(chatml_tokenizer, example) == (
        "Under Policy T-4.2 it is $62.<|im_end|>根据政策 T-4.2,每日餐费补贴为 $62。<|im_end|>"
    )
    # labels equal input ids where trained: next-token shift is the model's job
    assert all(
        lab in (IGNORE, tok) for tok, lab in zip(example.input_ids, example.labels, strict=True)
    )


def test_eos_is_trained_even_though_pad_equals_eos(chatml_tokenizer):
    align_eos(chatml_tokenizer)
    assert chatml_tokenizer.pad_token_id == chatml_tokenizer.eos_token_id
    example = ChatTokenizer(chatml_tokenizer)(MULTI_TURN)
    eos = chatml_tokenizer.eos_token_id
    trained_eos = [lab for lab in example.labels if lab == eos]
    assert len(trained_eos) == 2  # one per assistant turn; the user/system ones stay masked
    assert example.input_ids.count(eos) == 5


def test_rendering_is_the_model_template_not_a_human_gpt_format(chatml_tokenizer):
    example = ChatTokenizer(chatml_tokenizer)(MULTI_TURN)
    text = chatml_tokenizer.decode(example.input_ids)
    expected = chatml_tokenizer.apply_chat_template(list(MULTI_TURN.messages), tokenize=False)
    assert text == expected
    assert "human:" not in text and "gpt:" not in text


def test_prompt_tokens_match_what_a_chat_endpoint_renders(chatml_tokenizer):
    """The tokens before the last reply equal the generation-prompt rendering vLLM uses."""
    example = ChatTokenizer(chatml_tokenizer)(MULTI_TURN)
    prompt_ids = chatml_tokenizer.apply_chat_template(
        list(MULTI_TURN.messages[:3]), add_generation_prompt=True, tokenize=True
    )
    prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[len(prompt_ids) - 1] == IGNORE
    assert example.labels[len(prompt_ids)] != IGNORE


def test_template_with_bos_gets_exactly_one_bos():
    tokenizer = build_tokenizer(LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>")
    assert end_of_turn(tokenizer) == ("<|eot_id|>", tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    example = ChatTokenizer(tokenizer)(MULTI_TURN)
    bos = tokenizer.bos_token_id
    assert example.input_ids[0] == bos
    assert example.input_ids.count(bos) == 1
    assert trained_text(tokenizer, example).count("<|eot_id|>") == 2


def test_truncation_and_length(chatml_tokenizer):
    full = ChatTokenizer(chatml_tokenizer)(MULTI_TURN)
    cut = ChatTokenizer(chatml_tokenizer, max_length=20)(MULTI_TURN)
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20]
    assert not full.truncated


def test_end_of_turn_mismatch_fixed_by_align_eos():
    # the GGUF build of SmolLM2 names <|im_start|> as eos: the served model would never stop
    tokenizer = build_tokenizer(eos="<|im_start|>")

    class Cfg:
        eos_token_id = 1
        pad_token_id = None

    cfg = Cfg()
    eot_id = align_eos(tokenizer, cfg)
    assert tokenizer.eos_token == "<|im_end|>"
    assert cfg.eos_token_id == eot_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_template_without_end_of_turn_token_is_refused():
    tokenizer = build_tokenizer(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(TuneshipError, match="no special end-of-turn token"):
        end_of_turn(tokenizer)
