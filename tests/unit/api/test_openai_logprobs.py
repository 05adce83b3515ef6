"""Logprobs through the OpenAI API with the real `openai` client, against PEFT's log-softmax
(fp32, atol 1e-4): completions (echo, token-id prompts, max_tokens 0, the legacy object),
chat (logprobs + top_logprobs), streams, and requests without logprobs beside them."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ATOL = 1e-4
PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(llama_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=llama_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def peft_model(tiny_llama, llama_adapters):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return PeftModel.from_pretrained(base, llama_adapters["gen-a"]).eval()


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_scores_a_token_id_prompt_without_generating(client, tokenizer, peft_model):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs, max_tokens 0."""
    ids = tokenizer(PROMPT)["input_ids"]
    reply = client.completions.create(model="gen-a", prompt=ids, echo=True, logprobs=2, max_tokens=0, temperature=0)
    [choice] = reply.choices
    assert choice.text == tokenizer.decode(ids) and reply.usage.completion_tokens == 0
    found = choice.logprobs
    assert len(found.tokens) == len(ids) and found.tokens == [tokenizer.decode([i]) for i in ids]
    assert found.token_logprobs[0] is None and found.top_logprobs[0] is None
    expected = log_softmax(peft_model, ids)
    for position in range(1, len(ids)):
        assert abs(found.token_logprobs[position] - float(expected[position - 1, ids[position]])) < ATOL
        best = expected[position - 1].topk(2)
        top = found.top_logprobs[position]
        # Keys are token texts: two byte tokens that both decode to U+FFFD share one key.
        names = [tokenizer.decode([i]) for i in best.indices.tolist()]
        assert list(top) == list(dict.fromkeys(names))
        assert abs(top[names[0]] - float(best.values[0])) < ATOL
    assert found.text_offset == sorted(found.text_offset) and found.text_offset[0] == 0


def test_greedy_completion_logprobs_are_the_top_choice(client, tokenizer, peft_model):
    reply = client.completions.create(model="gen-a", prompt=PROMPT, logprobs=1, max_tokens=5, temperature=0)
    found = reply.choices[0].logprobs
    assert len(found.tokens) == reply.usage.completion_tokens == 5
    for logprob, top in zip(found.token_logprobs, found.top_logprobs):
        assert logprob == max(top.values())  # what lm-eval calls greedy: exactly equal
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    for step, logits in enumerate(out.logits):
        token = int(out.sequences[0, len(ids) + step])
        assert abs(found.token_logprobs[step] - float(logits[0].float().log_softmax(-1)[token])) < ATOL


def test_chat_logprobs_and_top_logprobs_equal_peft(client, tokenizer, peft_model):
    messages = [{"role": "user", "content": "paris is the capital of"}]
    reply = client.chat.completions.create(model="gen-a", messages=messages, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    for step, entry in enumerate(content):
        row = out.logits[step][0].float().log_softmax(-1)
        assert abs(entry.logprob - float(row.max())) < ATOL  # greedy: the most likely token
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())
    without = client.chat.completions.create(model="gen-a", messages=messages, max_tokens=4, temperature=0)
    assert without.choices[0].logprobs is None and without.choices[0].message.content == reply.choices[0].message.content


def test_streamed_logprobs_equal_the_whole_response(client):
    kwargs = dict(model="gen-a", prompt=PROMPT, logprobs=2, max_tokens=6, temperature=0, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    tokens, logprobs, text = [], [], ""
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert logprobs == whole.logprobs.token_logprobs


def test_requests_with_and_without_logprobs_share_batches(client):
    def ask(with_logprobs: bool):
        extra = {"logprobs": True, "top_logprobs": 1} if with_logprobs else {}
        return client.chat.completions.create(model="gen-a", messages=[{"role": "user", "content": "one two"}],
                                              max_tokens=6, temperature=0, **extra)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, [True, False] * 3))
    texts = {r.choices[0].message.content for r in replies}
    assert len(texts) == 1  # batching changes nothing about greedy answers
    assert all((r.choices[0].logprobs is not None) == (i % 2 == 0) for i, r in enumerate(replies))


def test_a_streamed_echo_arrives_even_when_the_answer_is_empty(client):
    """A stop string that matches the first generated text leaves the choice one event with no
    text: the echoed prompt must still be streamed (in its finish chunk)."""
    first = client.completions.create(model="gen-a", prompt=PROMPT, max_tokens=1, temperature=0).choices[0].text
    assert first.strip()
    kwargs = dict(model="gen-a", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, stop=[first])
    whole = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.text for chunk in client.completions.create(**kwargs, stream=True) for c in chunk.choices)
    assert whole.text == PROMPT and streamed == whole.text
