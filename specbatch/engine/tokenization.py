"""Prompt encoding and stop-string detection on incrementally detokenized text.

The tokenizer is always the checkpoint's own (transformers AutoTokenizer, no remote code).
A chat template may add a BOS token itself; the templated text is therefore encoded without
adding special tokens again (no double BOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Prompt = str | Sequence[dict[str, Any]]


class PromptError(ValueError):
    """A prompt that cannot be encoded (one line)."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: Prompt, chat_template: str | bool = "auto") -> list[int]:
    """Token ids of one prompt.

    prompt: plain text, or chat messages [{"role": ..., "content": ...}, ...].
    chat_template: "auto" applies the tokenizer's template to chat messages and to text when the
    tokenizer has one; True always applies it (text becomes one user message); False never
    (chat messages are then an error).
    """
    is_chat = not isinstance(prompt, str)
    if is_chat:
        messages = _check_messages(prompt)
    use_template = chat_template is True or (chat_template == "auto" and (is_chat or has_chat_template(tokenizer)))
    if is_chat and chat_template is False:
        raise PromptError("chat messages need a chat template, but chat_template is false")
    if not use_template:
        if not prompt:
            raise PromptError("prompt is empty")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not has_chat_template(tokenizer):
        raise PromptError("the tokenizer has no chat template; set input.chat_template: false for plain text")
    if not is_chat:
        if not prompt:
            raise PromptError("prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_messages(prompt: Sequence[Any]) -> list[dict[str, Any]]:
    messages = list(prompt)
    if not messages:
        raise PromptError("chat prompt has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"chat message {i} must be a mapping with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise PromptError(f"chat message {i} content must be text")
    return messages


def _list_decoder(tokenizer: Any) -> Any:
    """``tokenizer.decode`` for a flat list of ints.  transformers' own ``decode`` converts its
    argument id by id (tensors, arrays) and then calls ``_decode``; for a list of ints the
    conversion returns it unchanged, so ``_decode`` gives the same text several times faster.
    Any other decode (a tokenizer that overrides it, or not transformers') is used as it is."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        return tokenizer.decode
    if isinstance(tokenizer, PreTrainedTokenizerBase) and type(tokenizer).decode is PreTrainedTokenizerBase.decode:
        return tokenizer._decode
    return tokenizer.decode


WINDOW_CHARS = 16  # characters of the window's text before the new tokens, beyond the longest stop's length
CHARS_PER_TOKEN = 4  # the first guess of a window's span in tokens is its characters / this


@dataclass
class StopWindow:
    """One row's window for stop-string checks: the decoded text of its completion[start:end].
    ``span`` is the token count a (re)started window last needed to hold its characters."""

    start: int = 0
    end: int = -1  # -1: no window yet
    text: str = ""
    span: int = 0


class StopStringMatcher:
    """Finds the first stop string completed by newly emitted tokens.

    Text is decoded from the completion's token ids (special tokens skipped); a stop string may
    span several tokens. ``find`` is called once per step with the completion so far and the
    number of tokens this step added, and returns how many of them to keep.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self._decode = _list_decoder(tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(ids), skip_special_tokens=True)

    def find(self, ids: Sequence[int], num_new: int, window: "StopWindow | None" = None) -> tuple[int, str] | None:
        """(tokens of this step to keep, matched string) for the first stop completed, else None.

        ids: the completion so far, the step's num_new tokens last.  A step that completes no
        stop string is ruled out on a window of the text around the new tokens
        (:meth:`may_complete`; pass the row's ``window`` to carry it from step to step), so the
        cost of a step does not grow with the completion; only a step whose window shows a stop
        decodes the whole completion once per new token to find where the stop ends.
        """
        if not self.stops or num_new <= 0 or not self.may_complete(ids, num_new, window):
            return None
        before = len(ids) - num_new
        prev_len = len(self.decode(ids[:before])) if before else 0
        for k in range(1, num_new + 1):
            text = self.decode(ids[: before + k])
            start = max(0, prev_len - self.longest + 1)
            hits = [(text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                return k, min(hits)[1]
        return None

    def may_complete(self, ids: Sequence[int], num_new: int, window: "StopWindow | None" = None) -> bool:
        """Whether the last num_new tokens of ids may complete a stop string: a stop occurs in the
        text of a window of tokens ending with them, at or after the longest stop's length before
        the new text.  The window holds at least WINDOW_CHARS characters more than the longest
        stop before the new tokens (or starts at the completion's start), so text that a decoder
        changes at the window's start (a leading space, a partial character) lies before the part
        searched.  ``window`` (the row's, updated here) keeps the window's start and the text
        before the new tokens from the previous step: one decode per step.  A window restarts
        when it has grown to twice the span it started with, at the span the row last needed
        (a first guess of CHARS_PER_TOKEN characters a token, doubled until the text is long
        enough), so a step decodes about 1.5 spans plus its new tokens."""
        before = len(ids) - num_new
        window = window if window is not None else StopWindow()
        need = self.longest + WINDOW_CHARS  # characters before the new text
        if window.end != before or before - window.start > 2 * max(window.span, 1):
            span = window.span or -(-need // CHARS_PER_TOKEN)  # (re)start the window: a fresh row, or it grew long
            while True:
                window.start = max(0, before - span)
                window.text = self.decode(ids[window.start : before]) if before > window.start else ""
                if window.start == 0 or len(window.text) >= need:
                    break
                span *= 2
            window.span = span
        text = self.decode(ids[window.start :])
        start = max(0, len(window.text) - self.longest + 1)
        window.end, window.text = len(ids), text
        return any(text.find(s, start) >= 0 for s in self.stops)

    def final_text(self, ids: Sequence[int], stop: str | None) -> str:
        """Completion text; a matched stop string and what follows it are left out."""
        text = self.decode(ids)
        if stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text
