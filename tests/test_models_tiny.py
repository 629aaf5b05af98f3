"""The tiny checkpoint helper writes loadable, deterministic, peaked checkpoints."""

import json

import torch
import transformers
from safetensors.torch import load_file

from tests.tiny import BOS_ID, EOS_ID, make_tiny_checkpoint, make_tiny_pair


def test_tiny_checkpoint_is_deterministic_and_loads(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", arch="qwen2", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", arch="qwen2", seed=3)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.float32 for t in wa.values())
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert json.loads((a / "generation_config.json").read_text())["eos_token_id"] == EOS_ID

    model = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    probs = model(torch.arange(3, 19).view(2, 8)).logits.softmax(-1)  # [2, 8, 32]
    top = probs.max(-1).values
    assert 0.2 < top.mean() < 0.9  # peaked, not one-hot


def test_tiny_tokenizer_and_chat_template(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == 32 and tok.eos_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    ids = tok("a b c")["input_ids"]
    assert tok.decode(ids) == "a b c"
    chat = tok.apply_chat_template([{"role": "user", "content": "a b"}], add_generation_prompt=True)
    ids = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and 0 not in ids  # no <unk>


def test_tiny_pair_shares_tokenizer_with_padded_draft(tmp_path):
    target, draft = make_tiny_pair(tmp_path, draft_vocab_size=40)
    assert (target / "tokenizer.json").read_text() == (draft / "tokenizer.json").read_text()
    wt, wd = load_file(target / "model.safetensors"), load_file(draft / "model.safetensors")
    assert wt["lm_head.weight"].shape == (32, 32) and wd["lm_head.weight"].shape == (40, 32)
    assert not torch.equal(wt["model.layers.0.self_attn.q_proj.weight"], wd["model.layers.0.self_attn.q_proj.weight"])
    assert len(transformers.AutoTokenizer.from_pretrained(draft)) == 32
