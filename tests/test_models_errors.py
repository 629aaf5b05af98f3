"""Broken checkpoints and unknown models fail with one line naming the file/field and what was expected."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specbatch.models import CheckpointError, load_model, resolve_model_path
from tests.tiny import make_tiny_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return make_tiny_checkpoint(tmp_path / "m", arch="qwen2")


def error_of(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json: file not found" in error_of(ckpt)


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in error_of(ckpt)


def test_unsupported_architecture_names_it_and_the_supported_list(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    message = error_of(ckpt, backend="native")
    assert "unsupported architecture 'GPT2LMHeadModel'" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def test_missing_or_bad_fields(ckpt):
    edit_config(ckpt, hidden_size=None)
    assert "config.json: missing field 'hidden_size'" in error_of(ckpt)
    edit_config(ckpt, hidden_size=32, num_key_value_heads=3)
    assert "field 'num_key_value_heads' (3) must divide num_attention_heads (4)" in error_of(ckpt)
    edit_config(ckpt, num_key_value_heads=2, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    assert "rope_type 'yarn'" in error_of(ckpt)
    edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu")
    assert "field 'hidden_act' must be 'silu'" in error_of(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / "pytorch_model.bin")
    message = error_of(ckpt)
    assert "no model.safetensors or model.safetensors.index.json" in message
    assert "pytorch_model.bin" in message and "never loaded" in message


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights(ckpt, keep):
    data = (ckpt / "model.safetensors").read_bytes()
    cut = int(len(data) * keep)
    (ckpt / "model.safetensors").write_bytes(data[:cut])
    message = error_of(ckpt)
    assert f"model.safetensors: truncated safetensors file ({cut} bytes, its header describes {len(data)})" in message


def test_truncated_header(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:5])
    assert "model.safetensors: not a valid safetensors file" in error_of(ckpt)


def test_corrupt_weights(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors: not a valid safetensors file" in error_of(ckpt)


def test_missing_tensor_and_wrong_shape(ckpt):
    weights = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in weights.items() if k != name}, ckpt / "model.safetensors")
    assert f"missing tensor '{name}' (expected shape [16])" in error_of(ckpt)
    weights["model.norm.weight"] = torch.ones(31)
    save_file(weights, ckpt / "model.safetensors")
    assert "tensor 'model.norm.weight' has shape [31], expected [32] from config.json" in error_of(ckpt)


def test_sharded_checkpoint_loads_and_missing_shard_is_named(ckpt, tmp_path):
    weights = load_file(ckpt / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    sharded = tmp_path / "sharded"
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, sharded / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    tokens = torch.tensor([[3, 4, 5, 6]])
    a, b = load_model(ckpt), load_model(sharded)
    assert torch.equal(a(tokens, a.new_cache(1, 4), torch.tensor([0]), torch.tensor([4])),
                       b(tokens, b.new_cache(1, 4), torch.tensor([0]), torch.tensor([4])))

    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors: file not found" in error_of(sharded)
    del index["weight_map"][names[0]]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"tensor '{names[0]}' missing from weight_map" in error_of(sharded)


def test_bad_dtype(ckpt):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_model(ckpt, dtype="int8")


def test_unknown_model_name(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, **kw):
        raise OSError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError, match="no such directory; expected a checkpoint directory, a registered name"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="hub download failed .cannot reach the hub for no-such-owner/no-such-model"):
        resolve_model_path("no-such-owner/no-such-model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory, found a file"):
        resolve_model_path(tmp_path / "file")


def test_cache_overflow_is_refused(ckpt):
    model = load_model(ckpt)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="would hold 5 tokens but the cache's max_len is 4"):
        model(torch.tensor([[3, 4, 5, 6, 7]]), cache, torch.tensor([0]), torch.tensor([5]))
    assert cache.lengths.tolist() == [0]


def test_hub_id_resolves_through_snapshot_download(ckpt, monkeypatch):
    import huggingface_hub

    asked = {}

    def download(repo_id, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert load_model("some-owner/some-model").config.architecture == "Qwen2ForCausalLM"
    assert asked["repo_id"] == "some-owner/some-model"
    assert not any(p.endswith((".bin", ".pt", ".py")) for p in asked["patterns"])  # no pickles, no code


def test_missing_or_corrupt_tokenizer(ckpt):
    from specbatch.models import load_tokenizer

    (ckpt / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="the tokenizer files cannot be loaded") as info:
        load_tokenizer(ckpt)
    assert "\n" not in str(info.value)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files .expected one of tokenizer.json"):
        load_tokenizer(ckpt)
