"""Rendering a conversation with the tokenizer's own chat template, and which of its tokens the loss is on.

Owns: `ChatRenderer`, which turns messages into token ids and labels (the id on every token the assistant writes,
-100 elsewhere), from the rendered text itself: no template is parsed and no token id is guessed, so a checkpoint's
template (Qwen3's with its thinking blocks, tool calls and tool responses) is used exactly as released.

What the assistant writes, for assistant message i: the rendered text from the end of the generation prompt after
messages[:i] (what `apply_chat_template(messages[:i], add_generation_prompt=True)` renders: the text a model is given at
inference) up to and including the template's end-of-turn marker (found once per template by rendering a probe
conversation and reading what follows the assistant's content, e.g. `<|im_end|>`). Released templates are not always
prefix-stable, so when the rendering of messages[:i] is not a prefix of the whole conversation's: if the history
renders the same and only the generation prompt differs (Qwen3 with enable_thinking=false prompts with an empty think
block that earlier turns lack), the turn starts where the two part; if the history itself differs (Qwen3 drops the
thinking of assistant turns before the last user message), it starts after the first line of the assistant header
(e.g. `<|im_start|>assistant\n`) following the previous assistant turn. Tokens are labelled when they start inside
such a span (character offsets of a fast tokenizer). Templates with `{% generation %}` markers need nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from framework.data.packing import IGNORE_INDEX
_PROBE = "Probe answer 7f3a"  # assistant content whose rendering shows what follows a turn


class TemplateError(ValueError):
    """The chat template cannot render a conversation (its own raise_exception, a jinja error, no end-of-turn)."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool,
            kwargs: dict[str, Any]) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    except Exception as e:  # jinja2 TemplateError, TypeError/KeyError on a missing key, the template's own raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TemplateError(f"the chat template fails: {first}") from None
    if not isinstance(text, str):
        raise TemplateError(f"the chat template rendered a {type(text).__name__}, expected text")
    return text


def end_of_turn(tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any]) -> str:
    """The marker the template writes after an assistant turn's content (e.g. `<|im_end|>`, `<|eot_id|>`)."""
    text = _render(tokenizer, [{"role": "user", "content": "Probe question"},
                               {"role": "assistant", "content": _PROBE}], False, kwargs)
    at = text.rfind(_PROBE)
    tail = text[at + len(_PROBE):].strip() if at >= 0 else ""
    if not tail:
        raise TemplateError("the chat template writes nothing after an assistant message, so the end of an assistant "
                            "turn cannot be found; use a template that ends turns with a marker (chat.template)")
    return tail.split()[0]


class ChatRenderer:
    """Messages -> (input_ids, labels) with `tokenizer`'s chat template (`chat_template_kwargs` passed to it, e.g.
    {"enable_thinking": false}). `loss_on`: "all" assistant turns, or only the "last" one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, loss_on: str = "all",
                 chat_template_kwargs: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template; give one with chat.template=FILE.jinja")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("the tokenizer is not a fast tokenizer (tokenizer.json): labels need its character "
                                "offsets")
        if loss_on not in ("all", "last"):
            raise ValueError(f"loss_on must be 'all' or 'last', found {loss_on!r}")
        self.tokenizer, self.loss_on = tokenizer, loss_on
        self.kwargs = dict(chat_template_kwargs or {})
        self.eot = end_of_turn(tokenizer, self.kwargs)

    def render(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans [start, end) of the assistant's turns the loss is on)."""
        text = _render(self.tokenizer, messages, False, self.kwargs)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._turn_start(text, messages, i, cursor)
            end = text.find(self.eot, start)
            if end < 0:
                raise TemplateError(f"message {i} (assistant): its end-of-turn marker {self.eot!r} is missing from "
                                    "the rendered conversation")
            end += len(self.eot)
            spans.append((start, end))
            cursor = end
        if self.loss_on == "last":
            spans = spans[-1:]
        return text, spans

    def _turn_start(self, text: str, messages: Sequence[dict], i: int, cursor: int) -> int:
        prompt = _render(self.tokenizer, messages[:i], True, self.kwargs)
        if text.startswith(prompt) and len(prompt) >= cursor:
            return len(prompt)
        before = _render(self.tokenizer, messages[:i], False, self.kwargs) if i else ""
        common = len(os.path.commonprefix([prompt, text]))
        if text.startswith(before) and prompt.startswith(before) and common >= max(len(before), cursor):
            # the history renders as in context, the generation prompt does not all appear (Qwen3 with
            # enable_thinking=false prompts with an empty think block that earlier turns lack): the turn starts
            # where the two part
            return common
        # the history itself renders otherwise (Qwen3 keeps an earlier turn's thinking only while it follows the
        # last user message): the turn starts after the first line of the assistant header past the previous turn
        header = prompt[len(before):] if prompt.startswith(before) else ""
        header = header[:header.index("\n") + 1] if "\n" in header else header
        at = text.find(header, cursor) if header else -1
        if at < 0:
            raise TemplateError(f"message {i} (assistant): the template renders it differently inside the "
                                "conversation than after its generation prompt, and no assistant header "
                                f"{header!r} follows the previous turn")
        return at + len(header)

    def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels), int32 arrays of the rendered conversation; labels are the ids on the assistant's
        tokens (see the module docstring) and IGNORE_INDEX elsewhere."""
        text, spans = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        inside = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            inside |= (starts >= a) & (starts < b)
        return ids, np.where(inside, ids, IGNORE_INDEX).astype(np.int32)
