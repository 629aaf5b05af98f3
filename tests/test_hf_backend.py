"""The transformers backend gives transformers' own logits over the slot KV cache.

Each architecture of ``tests.tiny_hf`` (seven non-Llama decoders, each with what makes it differ
from Llama turned on) runs a scripted sequence of engine calls (prefills, ragged steps in
scrambled slot order, a width-0 row, a wide call, rollbacks, a slot refilled with another prompt)
in both cache layouts; after every call the logits at each row's real positions must equal
transformers' own float32 forward (eager attention) over that row's whole sequence.
"""

from __future__ import annotations

import pytest
import torch

from specbatch.models import load_model
from specbatch.models.hf_backend import TransformersModel
from tests.tiny_hf import ARCHS, WINDOW, make_tiny_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only adds synchronization

VOCAB = 48
ROWS, ROW_LEN, PROMPTS, PROMPT_LEN = 5, 40, 3, 24
TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(our model, transformers' reference model) of one architecture."""
    import transformers

    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / request.param, request.param, vocab_size=VOCAB)
    ours = load_model(path, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return ours, ref


class Script:
    """Engine-like calls on one cache layout, each checked against the reference forward."""

    def __init__(self, model, ref, shared: bool):
        self.model, self.ref, self.shared = model, ref, shared
        if shared:
            self.cache = model.new_cache(ROWS, ROW_LEN, prompt_slots=PROMPTS, prompt_len=PROMPT_LEN)
        else:
            self.cache = model.new_cache(ROWS + 1, PROMPT_LEN + ROW_LEN)  # the last slot prefills
        self.seqs: dict[int, list[int]] = {}  # row slot -> the tokens its cache holds (logically)
        self.gen = torch.Generator().manual_seed(5)

    def expected(self, seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.ref(input_ids=torch.tensor([seq])).logits[0]  # [len, V]

    def admit(self, prompt: list[int], rows: list[int], prompt_slot: int) -> None:
        """Prefill the prompt's head once, then fan it out to its rows (copy or link)."""
        slot = ROWS + prompt_slot if self.shared else ROWS
        self.cache.reset([slot])
        head = prompt[:-1]
        if head:
            got = self.model(torch.tensor([head]), self.cache, torch.tensor([slot]), torch.tensor([len(head)]),
                             last_only=True)
            torch.testing.assert_close(got[0, 0], self.expected(head)[-1], **TOL)
        self.cache.copy_prefix(slot, rows, len(head))
        for r in rows:
            self.seqs[r] = list(head)

    def step(self, slots: list[int], widths: list[int]) -> None:
        W = max(widths)
        tokens = torch.randint(0, VOCAB, (len(slots), W), generator=self.gen)
        got = self.model(tokens, self.cache, torch.tensor(slots), torch.tensor(widths))
        assert got.shape == (len(slots), W, VOCAB) and got.dtype == torch.float32
        for r, (slot, k) in enumerate(zip(slots, widths)):
            self.seqs[slot] += tokens[r, :k].tolist()
            if k:
                torch.testing.assert_close(got[r, :k], self.expected(self.seqs[slot])[-k:], **TOL)
            assert int(self.cache.lengths[slot]) == len(self.seqs[slot])

    def rollback(self, slots: list[int], keep: list[int]) -> None:
        """Drop all but the first ``keep`` tokens of each row (rejected proposals)."""
        self.cache.set_lengths(slots, keep)
        for slot, k in zip(slots, keep):
            self.seqs[slot] = self.seqs[slot][:k]


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_logits_equal_transformers_at_ragged_positions_rollback_and_refill(pair, shared):
    model, ref = pair
    assert isinstance(model, TransformersModel)
    s = Script(model, ref, shared)
    a = [5, 9, 11, 3, 7, 2, 8, 1, 4, 6, 10, 12, 13, 14, 15, 16, 17, 20, 21]  # prefill wider than 16
    b, c = [12, 4, 4], [30]  # c: a one-token prompt (no prefix)
    s.admit(a, [0, 2], prompt_slot=0)
    s.admit(b, [4, 1], prompt_slot=1)
    s.admit(c, [3], prompt_slot=2)
    s.step([0, 2, 4, 1, 3], [1, 1, 1, 1, 1])
    s.step([3, 0, 4, 2, 1], [4, 1, 3, 2, 0])  # ragged, scrambled slot order, a width 0
    s.step([2, 1], [3, 1])  # a subset, out of slot order
    s.rollback([0, 2, 4], [len(a) - 1 + 1, len(a) - 1, len(b) - 1 + 2])
    s.step([0, 2, 4], [2, 5, 3])
    s.step(list(range(ROWS)), [18, 1, 2, 3, 1])  # a wide call (W > 16)
    # Refill: row 2 finishes, its slot takes a sample of b; prompt slot 0 (a) still serves row 0.
    s.cache.reset([2])
    s.admit(b, [2], prompt_slot=1)
    s.step([2, 0, 3, 1], [3, 1, 2, 1])
    assert max(len(seq) for seq in s.seqs.values()) > 3 * WINDOW  # sliding windows were crossed


def test_last_only_gives_each_rows_last_real_position(pair):
    model, ref = pair
    cache = model.new_cache(3, 16)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
    widths = torch.tensor([4, 2, 0])
    got = model(tokens, cache, torch.tensor([1, 2, 0]), widths, last_only=True)  # [3, 1, V]
    with torch.no_grad():
        torch.testing.assert_close(got[0, 0], ref(input_ids=tokens[:1, :4]).logits[0, -1], **TOL)
        torch.testing.assert_close(got[1, 0], ref(input_ids=tokens[1:2, :2]).logits[0, -1], **TOL)
    assert cache.lengths.tolist() == [0, 4, 2]


def test_bfloat16_logits_follow_the_float32_ones(pair):
    """Half precision runs (and rounds) like transformers' own bfloat16 forward does, roughly."""
    model, ref = pair
    path = ref.name_or_path
    half = load_model(path, dtype="bfloat16", backend="transformers")
    assert half.config.dtype == torch.bfloat16 and half.new_cache(2, 8).k[0].dtype == torch.bfloat16
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    got = half(tokens, half.new_cache(1, 8), torch.tensor([0]), torch.tensor([8]))[0]
    with torch.no_grad():
        want = ref(input_ids=tokens).logits[0]
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_a_model_whose_layers_bypass_our_attention_is_refused_at_its_first_call(pair):
    """Every layer must attend through the slot cache: one that does not would read no history."""
    model, _ = pair
    path = model.hf.name_or_path
    bypassed = load_model(path, dtype="float32", backend="transformers")
    bypassed.hf.config._attn_implementation = "eager"  # as if the model's code ignored the interface
    with pytest.raises(RuntimeError, match=f"{model.config.architecture}: 0 of 3 layers called the specbatch attention"):
        bypassed(torch.tensor([[3, 4]]), bypassed.new_cache(1, 4), torch.tensor([0]), torch.tensor([2]))
