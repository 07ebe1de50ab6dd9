"""Chat-template facts every stage must agree on: the end-of-turn token and the eos settings.

Functions take a tokenizer (and model) object from the caller, so this core module imports no
heavy library. The end-of-turn token is read off the template itself, so tokenizer eos,
generation_config eos and the template can be made to agree (a mismatch makes a model never stop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuneship.infra.errors import TuneshipError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

_SENTINEL = "TUNESHIP_SENTINEL_REPLY"
_SYSTEM_SENTINEL = "TUNESHIP_SENTINEL_SYSTEM"


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[Any, Any]] | None = None,
) -> str:
    """The chat template's text for messages (apply_chat_template without tokenizing); tools:
    the functions the conversation declares, passed as an OpenAI request passes them."""
    functions: list[dict[Any, Any] | Callable[..., Any]] | None = list(tools) if tools else None
    text = tokenizer.apply_chat_template(
        messages,
        tools=functions,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def system_turns(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template does with a system turn: 'rendered' (its text is in the prompt,
    where the template puts it: Gemma 3 folds it into the first user turn), 'dropped' (the text
    is not there) or 'refused' (the template raises, as Gemma 2's and Mistral's do)."""
    messages = [
        {"role": "system", "content": _SYSTEM_SENTINEL},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    try:
        text = render(tokenizer, messages)
    except Exception:  # jinja's TemplateError from raise_exception, or any other refusal
        return "refused"
    return "rendered" if _SYSTEM_SENTINEL in text else "dropped"


def check_system_turns(tokenizer: PreTrainedTokenizerBase, count: int, example: str) -> None:
    """Refuse, before training, data whose system turns the template cannot render: count
    conversations have one, example is one of their ids."""
    if not count:
        return
    handling = system_turns(tokenizer)
    if handling == "rendered":
        return
    raise TuneshipError(
        f"the base's chat template {handling} system turns, and {count} "
        f"conversation(s) have one (e.g. {example}): training would "
        f"{'fail on them' if handling == 'refused' else 'drop their text silently'}. Remove "
        "them, or set system_turns: fold to put the system text at the start of the first user "
        "turn (send it that way to the served model too: its template refuses system turns)"
    )


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    """The token the chat template writes right after an assistant reply, as (text, id)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TuneshipError("the tokenizer has no chat template; pick a chat/instruct base model")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _SENTINEL},
    ]
    text = render(tokenizer, messages)
    tail = text[text.index(_SENTINEL) + len(_SENTINEL) :]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    added = tokenizer.get_added_vocab()
    if ids:
        token = tokenizer.convert_ids_to_tokens(int(ids[0]))
        if isinstance(token, str) and (token in added or token in tokenizer.all_special_tokens):
            return token, ids[0]
    raise TuneshipError(
        "the chat template writes no special end-of-turn token after an assistant reply "
        f"(it writes {tail!r}); the served model would not know when to stop"
    )


def align_eos(
    tokenizer: PreTrainedTokenizerBase,
    model_config: PretrainedConfig | None = None,
    generation_config: GenerationConfig | None = None,
) -> int:
    """Make tokenizer eos, model config eos and generation_config eos the end-of-turn token.

    Sets a pad token (the end-of-turn token) when the tokenizer has none: labels are built
    from explicit masks, never from pad positions, so pad == eos cannot mask the eos.
    """
    token, token_id = end_of_turn(tokenizer)
    tokenizer.eos_token = token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = token
    for cfg in (model_config, generation_config):
        if cfg is not None:
            cfg.eos_token_id = token_id
            if getattr(cfg, "pad_token_id", None) is None:
                cfg.pad_token_id = tokenizer.pad_token_id
    return token_id
