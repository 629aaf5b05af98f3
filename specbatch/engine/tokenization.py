"""Prompt encoding and stop-string detection on incrementally detokenized text.

The tokenizer is always the checkpoint's own (transformers AutoTokenizer, no remote code).
A chat template may add a BOS token itself; the templated text is therefore encoded without
adding special tokens again (no double BOS).
"""

from __future__ import annotations

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

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def find(self, ids: Sequence[int], num_new: int) -> tuple[int, str] | None:
        """(tokens of this step to keep, matched string) for the first stop completed, else None."""
        if not self.stops or num_new <= 0:
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

    def final_text(self, ids: Sequence[int], stop: str | None) -> str:
        """Completion text; a matched stop string and what follows it are left out."""
        text = self.decode(ids)
        if stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text
