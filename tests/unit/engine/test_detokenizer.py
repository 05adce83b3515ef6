"""Incremental detokenizing: the streamed deltas add up to the full decode, stop strings cut
where they start, and each token costs a bounded decode however long the answer is."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.sampling import Detokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "café déjà vu — naïve façade, 東京 and 🦊🦊 emoji",
    "select name from users where id = 1; -- done",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def stream(detokenizer: Detokenizer, ids: list[int]) -> tuple[str, bool]:
    parts, stopped = [], False
    for token in ids:
        text, stopped = detokenizer.push(token)
        parts.append(text)
        if stopped:
            break
    parts.append(detokenizer.flush())
    return "".join(parts), stopped


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 4  # byte-level tokens: multi-byte characters span several
    got, stopped = stream(Detokenizer(tokenizer, ()), ids)
    assert got == tokenizer.decode(ids, skip_special_tokens=True) and not stopped


def test_no_half_character_is_ever_emitted(tokenizer):
    ids = tokenizer("东京🦊", add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer, ())
    for token in ids:
        text, _ = detokenizer.push(token)
        assert "\ufffd" not in text


def test_a_stop_string_split_across_tokens_ends_the_text_before_it(tokenizer):
    text = "one two three four five six"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    got, stopped = stream(Detokenizer(tokenizer, ("four",)), ids)
    assert stopped and got == "one two three "


def test_each_token_decodes_a_bounded_window(tokenizer):
    """A long answer must not re-decode everything so far at every token (quadratic)."""
    windows: list[int] = []
    real_decode = tokenizer.decode

    class Spy:
        def decode(self, ids, **kwargs):
            windows.append(len(ids))
            return real_decode(ids, **kwargs)

    ids = tokenizer(" ".join(TEXTS * 8), add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    got, _ = stream(Detokenizer(Spy(), ()), ids)
    assert got == real_decode(ids, skip_special_tokens=True)
    assert max(windows) <= 8, max(windows)
