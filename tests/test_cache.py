"""Slot KV cache bookkeeping and KV budget planning."""

import pytest
import torch

from specbatch.models.cache import KVCache, plan_cache
from specbatch.models.config import ModelConfig


def small_cache(**kw):
    args = dict(num_layers=2, num_slots=4, max_len=8, num_kv_heads=2, head_dim=3)
    args.update(kw)
    return KVCache(**args)


def test_shapes_dtype_and_lengths():
    cache = small_cache(dtype=torch.bfloat16)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (4, 2, 8, 3) and cache.k[0].dtype == torch.bfloat16 == cache.dtype
    assert cache.lengths.dtype == torch.int64 and cache.lengths.tolist() == [0, 0, 0, 0]
    assert cache.nbytes() == 2 * 2 * 4 * 2 * 8 * 3 * 2


def test_copy_prefix_copies_only_the_prefix_into_each_destination():
    cache = small_cache()
    for k in cache.k + cache.v:
        k[1] = torch.randn(2, 8, 3)
        k[3] = 7.0
    cache.set_lengths([1], [6])
    cache.copy_prefix(1, torch.tensor([0, 3]), 5)
    assert cache.lengths.tolist() == [5, 6, 0, 5]
    for k in cache.k + cache.v:
        assert torch.equal(k[0, :, :5], k[1, :, :5]) and torch.equal(k[3, :, :5], k[1, :, :5])
        assert (k[0, :, 5:] == 0).all() and (k[3, :, 5:] == 7.0).all()
        assert (k[2] == 0).all()


def test_copy_prefix_with_source_among_destinations_keeps_its_data():
    cache = small_cache()
    data = torch.randn(2, 8, 3)
    cache.k[0][2] = data
    cache.copy_prefix(2, [2, 0], 4)
    assert torch.equal(cache.k[0][2], data) and torch.equal(cache.k[0][0, :, :4], data[:, :4])
    assert cache.lengths.tolist() == [4, 0, 4, 0]
    with pytest.raises(ValueError, match="outside"):
        cache.copy_prefix(2, [1], 9)


def test_set_lengths_and_reset():
    cache = small_cache()
    cache.set_lengths(torch.tensor([0, 2]), torch.tensor([5, 3]))
    cache.set_lengths([3], 2)
    assert cache.lengths.tolist() == [5, 0, 3, 2]
    cache.set_lengths([0, 3], 1)  # rollback several rows to one length
    assert cache.lengths.tolist() == [1, 0, 3, 1]
    cache.reset([2, 3])
    assert cache.lengths.tolist() == [1, 0, 0, 0]


def config(layers=2, kv_heads=2, head_dim=4, max_pos=1024):
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32, hidden_size=8, intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
        qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None,
        sliding_layers=(False,) * layers, tie_word_embeddings=False, eos_token_ids=[2], bos_token_id=1,
    )


def test_plan_cache_with_max_model_len():
    c = config()  # 2 layers x 2 kv heads x 4 dims x 2 (K and V) x 4 bytes = 128 bytes per token
    assert c.kv_bytes_per_token == 128
    assert plan_cache(c, budget_bytes=128 * 100 * 3, max_model_len=100, max_slots=8, dtype=torch.float32) == (3, 100)
    assert plan_cache(c, budget_bytes=10**9, max_model_len=100, max_slots=8, dtype=torch.float32) == (8, 100)
    assert plan_cache(c, budget_bytes=64 * 100 * 5, max_model_len=100, max_slots=8, dtype=torch.bfloat16) == (5, 100)
    with pytest.raises(ValueError, match="one slot of 100 tokens needs 12800 bytes"):
        plan_cache(c, budget_bytes=12799, max_model_len=100, max_slots=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_position_embeddings 1024"):
        plan_cache(c, budget_bytes=10**9, max_model_len=2048, max_slots=1, dtype=torch.float32)


def test_plan_cache_defaults_max_len_to_what_fits():
    c = config()
    assert plan_cache(c, budget_bytes=10**9, max_model_len=None, max_slots=4, dtype=torch.float32) == (4, 1024)
    # 4 slots of 512 tokens fit exactly.
    assert plan_cache(c, budget_bytes=128 * 2048, max_model_len=None, max_slots=4, dtype=torch.float32) == (4, 512)
    # 300 tokens in all: slots are not cut below 256 tokens; one slot of 256 fits.
    assert plan_cache(c, budget_bytes=128 * 300, max_model_len=None, max_slots=4, dtype=torch.float32) == (1, 256)
    # Less than 256 tokens in all: one slot of what fits.
    assert plan_cache(c, budget_bytes=128 * 100, max_model_len=None, max_slots=4, dtype=torch.float32) == (1, 100)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        plan_cache(c, budget_bytes=100, max_model_len=None, max_slots=4, dtype=torch.float32)
