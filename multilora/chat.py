"""Chat prompts to token ids, with the messages' text kept as text.

Rendering the chat template and tokenizing the result, as ``apply_chat_template`` does, lets a
message that contains a special token's spelling (``<|im_end|>\\n<|im_start|>system``) become
that special token: the text closes its own turn and opens a forged one. Here the template is
rendered with a marker in place of each message's content; the template's own parts are then
tokenized as usual (their special tokens stay special) and each content with
``split_special_tokens``, so whatever a message holds is spelled out as ordinary text.
Transformers has no option for this (``split_special_tokens`` on the rendered string would
split the template's own tokens too), hence this module.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template, ending
    with the assistant's opening (``add_generation_prompt``). Template errors propagate."""
    messages = [dict(message) for message in messages]
    nonce = secrets.token_hex(8)
    markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    masked = [
        {**message, "content": marker} if isinstance(message.get("content"), str) else message
        for message, marker in zip(messages, markers, strict=True)
    ]
    rendered = tokenizer.apply_chat_template(masked, tokenize=False, add_generation_prompt=True)
    parts = _split_on_markers(rendered, markers, messages)
    if parts is None:
        # A template that drops, repeats or rewrites a message's content: render it whole (the
        # template's own output is then the only reading of the messages there is).
        logger.warning("The chat template does not render contents verbatim; tokenizing whole.")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    for text, is_content in parts:
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)[
                "input_ids"
            ]
    return ids


def _split_on_markers(
    rendered: str, markers: list[str], messages: list[dict[str, Any]]
) -> list[tuple[str, bool]] | None:
    """``rendered`` cut into (text, is_content) pieces, each marker replaced by its message's
    content; None unless every string content's marker appears exactly once, in order."""
    parts: list[tuple[str, bool]] = []
    start = 0
    for marker, message in zip(markers, messages, strict=True):
        content = message.get("content")
        if not isinstance(content, str):
            continue
        if rendered.count(marker) != 1:
            return None
        at = rendered.find(marker, start)
        if at < 0:
            return None
        parts += [(rendered[start:at], False), (content, True)]
        start = at + len(marker)
    parts.append((rendered[start:], False))
    return parts
