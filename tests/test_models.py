"""The native forward matches transformers' logits on random tiny checkpoints of every architecture.

transformers runs each full sequence in one call (the oracle); the native model runs the same
tokens as a prefill and then ragged multi-token steps, each row at its own positions, in
arbitrary slots, with garbage in the padding.
"""

import pytest
import torch
import transformers

from specbatch.models import load_model
from specbatch.models.rope import inverse_frequencies
from tests.tiny import make_tiny_checkpoint

ATOL = 2e-5  # float32 rounding; logits are O(10)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "llama": dict(arch="llama"),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "llama-tied-bias": dict(arch="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama-mha": dict(arch="llama", num_kv_heads=4),
    "mistral-sliding": dict(arch="mistral", sliding_window=5),
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(arch="qwen3"),
    "qwen3-gqa4": dict(arch="qwen3", num_heads=8, num_kv_heads=2),
}
SEQ = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_tiny_checkpoint(root / name, seed=i, **kw) for i, (name, kw) in enumerate(CONFIGS.items())}


def reference_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits  # [R, T, V]


def ragged_run(model, tokens, slots, chunks, max_len=40):
    """Feed tokens[r] in chunks (one width per step, chunk sizes per row); return logits per row."""
    R = tokens.shape[0]
    cache = model.new_cache(num_slots=int(slots.max()) + 2, max_len=max_len)
    got = [[] for _ in range(R)]
    fed = [0] * R
    for sizes in chunks:
        W = max(sizes)
        step = torch.randint(0, model.config.vocab_size, (R, W))  # garbage padding
        for r, n in enumerate(sizes):
            step[r, :n] = tokens[r, fed[r]: fed[r] + n]
        logits = model(step, cache, slots, torch.tensor(sizes))  # [R, W, V]
        assert logits.shape == (R, W, model.config.vocab_size) and logits.dtype == torch.float32
        for r, n in enumerate(sizes):
            got[r].append(logits[r, :n])
            fed[r] += n
    assert cache.lengths[slots].tolist() == fed
    return [torch.cat(g) for g in got], cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_transformers(checkpoints, name):
    path = checkpoints[name]
    tokens = torch.randint(0, 32, (3, SEQ), generator=torch.Generator().manual_seed(1))
    want = reference_logits(path, tokens)
    model = load_model(path)
    cache = model.new_cache(num_slots=4, max_len=SEQ)
    slots = torch.tensor([0, 1, 2])
    got = model(tokens, cache, slots, torch.full((3,), SEQ))  # wider than 16: the SDPA path
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [SEQ, SEQ, SEQ, 0]

    cache = model.new_cache(num_slots=4, max_len=SEQ)
    lengths = torch.tensor([SEQ, 7, 13])
    last = model(tokens, cache, torch.tensor([3, 1, 0]), lengths, last_only=True)  # [3, 1, V]
    assert last.shape == (3, 1, 32)
    for r, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(last[r, 0], want[r, n - 1], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [13, 7, 0, SEQ]


@pytest.mark.parametrize("slots", [[4, 0, 2], [2, 0, 1]], ids=["scattered", "permuted-run"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ragged_steps_match_transformers(checkpoints, name, slots):
    path = checkpoints[name]
    tokens = torch.randint(0, 32, (3, SEQ), generator=torch.Generator().manual_seed(2))
    want = reference_logits(path, tokens)
    model = load_model(path)
    # Rows start from different prompt lengths, then take 1..5-token steps (some rows idle),
    # so each step has rows at different positions; slots are not 0..R-1.
    chunks = [(6, 3, 9), (1, 5, 2), (4, 0, 1), (5, 5, 5), (1, 2, 3), (3, 4, 0), (4, 5, 4)]
    assert all(sum(c[r] for c in chunks) == SEQ for r in range(3))
    got, _ = ragged_run(model, tokens, torch.tensor(slots), chunks)
    for r in range(3):
        torch.testing.assert_close(got[r], want[r], atol=ATOL, rtol=0)


def test_contiguous_slot_run_matches_gathered_slots(checkpoints):
    model = load_model(checkpoints["qwen3"])
    tokens = torch.randint(0, 32, (2, SEQ), generator=torch.Generator().manual_seed(3))
    chunks = [(5, 8), (1, 1), (3, 2), (15, 13)]
    a, _ = ragged_run(model, tokens, torch.tensor([2, 3]), chunks)   # a contiguous run: views
    b, _ = ragged_run(model, tokens, torch.tensor([3, 1]), chunks)   # scattered: gathered
    c, _ = ragged_run(model, tokens, torch.tensor([1, 0]), chunks)   # a run out of order: permuted
    for r in range(2):
        torch.testing.assert_close(a[r], b[r], atol=ATOL, rtol=0)
        torch.testing.assert_close(c[r], b[r], atol=ATOL, rtol=0)


def test_padding_is_never_written_and_rollback_recomputes(checkpoints):
    model = load_model(checkpoints["llama"])
    cache = model.new_cache(num_slots=2, max_len=16)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(prompt, cache, torch.tensor([0]), torch.tensor([4]))
    assert cache.lengths.tolist() == [4, 0]
    assert all(k[0, :, 4:].abs().sum() == 0 and k[1].abs().sum() == 0 for k in cache.k + cache.v)

    # A 3-token step whose last 2 proposals are then rejected: roll back and feed the recovered one.
    first = model(torch.tensor([[11, 12, 13]]), cache, torch.tensor([0]), torch.tensor([3]))
    cache.set_lengths([0], [5])
    again = model(torch.tensor([[20]]), cache, torch.tensor([0]), torch.tensor([1]))
    fresh = model.new_cache(num_slots=1, max_len=16)
    want = model(torch.tensor([[5, 6, 7, 8, 11, 20]]), fresh, torch.tensor([0]), torch.tensor([6]))
    torch.testing.assert_close(first[0, 0], want[0, 4], atol=ATOL, rtol=0)
    torch.testing.assert_close(again[0, 0], want[0, 5], atol=ATOL, rtol=0)


def test_copy_prefix_fans_out_one_prefill(checkpoints):
    model = load_model(checkpoints["mistral-sliding"])
    cache = model.new_cache(num_slots=4, max_len=20)
    prompt = torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(4))
    model(prompt, cache, torch.tensor([1]), torch.tensor([9]), last_only=True)
    cache.copy_prefix(1, [0, 2, 3], 9)
    assert cache.lengths.tolist() == [9, 9, 9, 9]
    nxt = torch.tensor([[3], [4], [5], [6]])
    got = model(nxt, cache, torch.arange(4), torch.ones(4, dtype=torch.int64))  # [4, 1, V]
    for r in range(4):
        fresh = model.new_cache(num_slots=1, max_len=20)
        want = model(torch.cat([prompt[0], nxt[r]])[None], fresh, torch.tensor([0]), torch.tensor([10]))
        torch.testing.assert_close(got[r, 0], want[0, -1], atol=ATOL, rtol=0)


def test_sliding_window_changes_logits(tmp_path):
    """The sliding-window test has power: the same weights without a window give other logits."""
    windowed = load_model(make_tiny_checkpoint(tmp_path / "w", arch="mistral", sliding_window=4))
    full = load_model(make_tiny_checkpoint(tmp_path / "f", arch="mistral", sliding_window=None))
    tokens = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(5))
    a = windowed(tokens, windowed.new_cache(1, 12), torch.tensor([0]), torch.tensor([12]))
    b = full(tokens, full.new_cache(1, 12), torch.tensor([0]), torch.tensor([12]))
    torch.testing.assert_close(a[0, :4], b[0, :4], atol=ATOL, rtol=0)
    assert (a[0, 4:] - b[0, 4:]).abs().max() > 1e-2


def test_config_facts(checkpoints):
    qwen3 = load_model(checkpoints["qwen3"]).config
    assert qwen3.architecture == "Qwen3ForCausalLM" and qwen3.head_dim == 16 and qwen3.qk_norm
    assert qwen3.eos_token_ids == [2] and qwen3.bos_token_id == 1 and qwen3.dtype == torch.float32
    mistral = load_model(checkpoints["mistral-sliding"]).config
    assert mistral.sliding_window == 5 and all(mistral.sliding_layers)
    qwen2 = load_model(checkpoints["qwen2"]).config
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None
    llama = load_model(checkpoints["llama3-rope"]).config
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.num_key_value_heads == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16])
def test_half_precision_close_to_float32(checkpoints, dtype):
    path = checkpoints["qwen2"]
    tokens = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(6))
    want = load_model(path)(tokens, load_model(path).new_cache(2, 10), torch.arange(2), torch.full((2,), 10))
    model = load_model(path, dtype=dtype)
    cache = model.new_cache(2, 10)
    assert cache.k[0].dtype == model.dtype == model.config.dtype != torch.float32
    got = model(tokens, cache, torch.arange(2), torch.full((2,), 10))
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.25
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_generate_matches_transformers_greedy(checkpoints):
    path = checkpoints["llama"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 7, 8, 9]])
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    model = load_model(path)
    cache = model.new_cache(1, 32)
    logits = model(prompt, cache, torch.tensor([0]), torch.tensor([4]), last_only=True)
    got = []
    for _ in range(12):
        token = int(logits[0, -1].argmax())
        got.append(token)
        logits = model(torch.tensor([[token]]), cache, torch.tensor([0]), torch.tensor([1]))
    assert got == want


def test_packed_bfloat16_linears_equal_plain_ones(checkpoints, monkeypatch):
    """The oneDNN pre-packed path (chosen on CPUs that support it) gives F.linear's results."""
    import specbatch.models.llama as llama

    path = checkpoints["qwen2"]
    tokens = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(7))

    def run(model):
        return model(tokens, model.new_cache(2, 7), torch.arange(2), torch.tensor([7, 4]))

    packed = load_model(path, dtype="bfloat16")
    monkeypatch.setattr(llama, "_onednn_packing_works", lambda device, dtype: False)
    plain = load_model(path, dtype="bfloat16")
    assert not plain.packed
    if not packed.packed:
        pytest.skip("this CPU has no oneDNN bfloat16 packing")
    torch.testing.assert_close(run(packed)[0], run(plain)[0], atol=0, rtol=0)
    torch.testing.assert_close(run(packed)[1, :4], run(plain)[1, :4], atol=0, rtol=0)


def test_float32_attention_for_small_bfloat16_steps(checkpoints, monkeypatch):
    """Small narrow steps of a half-precision model attend in float32 on CPU; the logits agree
    with half-precision attention to bfloat16 rounding, and larger steps keep half precision."""
    import specbatch.models.llama as llama

    model = load_model(checkpoints["llama"], dtype="bfloat16")
    prompt = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(3))
    step = torch.randint(0, 32, (3, 2), generator=torch.Generator().manual_seed(4))
    used = []
    real = llama._matmul_attention
    monkeypatch.setattr(llama, "_matmul_attention", lambda q, *rest: used.append(q.dtype) or real(q, *rest))

    def decode(limit):
        monkeypatch.setattr(llama, "CPU_FLOAT32_ATTENTION_MAX_ELEMENTS", limit)
        cache = model.new_cache(3, 11)
        model(prompt, cache, torch.arange(3), torch.full((3,), 9))
        used.clear()
        return model(step, cache, torch.arange(3), torch.tensor([2, 1, 2]))

    half = decode(0)
    assert set(used) == {torch.bfloat16}
    full = decode(1 << 17)
    assert set(used) == {torch.float32}
    for row, n in enumerate([2, 1, 2]):
        torch.testing.assert_close(full[row, :n], half[row, :n], atol=0.1, rtol=0.02)


def test_older_config_layout_reads_the_same(checkpoints, tmp_path):
    """Hub checkpoints written by older transformers keep rope_theta / rope_scaling at the top level."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(checkpoints["llama3-rope"], old)
    config = json.loads((old / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}  # the oldest spelling: "type"
    config.pop("head_dim", None)
    (old / "config.json").write_text(json.dumps(config))

    a, b = load_model(checkpoints["llama3-rope"]), load_model(old)
    assert b.config.rope_scaling == a.config.rope_scaling and b.config.head_dim == a.config.head_dim
    tokens = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(8))
    run = lambda m: m(tokens, m.new_cache(1, 20), torch.tensor([0]), torch.tensor([20]))  # noqa: E731
    assert torch.equal(run(a), run(b))

    plain = load_model(checkpoints["llama"])
    assert plain.config.rope_scaling is None
    scaled_freq, plain_freq = a.inv_freq, inverse_frequencies(8, 10000.0, None)
    assert (scaled_freq <= plain_freq).all() and (scaled_freq < plain_freq).any()  # scaling slows rotations
