"""Prompt encoding (chat templates, no double BOS) and stop strings on incremental text."""

from __future__ import annotations

import pytest

from specbatch.models import load_tokenizer
from specbatch.engine.tokenization import PromptError, StopStringMatcher, encode_prompt
from tests.tiny import BOS_ID, EOS_ID, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_checkpoint(tmp_path_factory.mktemp("tok"), vocab_size=40))


def test_chat_template_adds_exactly_one_bos(tok):
    ids = encode_prompt(tok, [{"role": "user", "content": "a b c"}])
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    assert tok.decode(ids[-2:]) == "assistant :"  # the generation prompt is there
    # "auto" templates plain text when the tokenizer has a template; False never does.
    assert encode_prompt(tok, "a b c", "auto") == ids
    assert encode_prompt(tok, "a b c", False) == tok("a b c")["input_ids"]


def test_bad_prompts_are_one_line_errors(tok):
    for prompt, chat in [([], "auto"), ([{"role": "user"}], "auto"), ("", False), ([{"role": "user", "content": "a"}], False)]:
        with pytest.raises(PromptError) as err:
            encode_prompt(tok, prompt, chat)
        assert "\n" not in str(err.value)


def test_stop_string_spanning_tokens_is_found_at_the_completing_token(tok):
    m = StopStringMatcher(tok, ["c d"])
    ids = tok("a b c d e")["input_ids"]
    assert m.find(ids[:2], 2) is None
    # c and d arrive in one step with e after them: keep up to d.
    assert m.find(ids, 3) == (2, "c d")
    assert m.final_text(ids[:4], "c d") == "a b "
    # Already-seen text before this step's tokens is not matched again.
    assert StopStringMatcher(tok, ["a"]).find(ids, 2) is None


def test_special_tokens_are_skipped_in_text(tok):
    m = StopStringMatcher(tok, [])
    ids = tok("a b")["input_ids"] + [EOS_ID]
    assert m.final_text(ids, None) == "a b"
