"""The engine's per-slot state (specbatch.engine.slots) against the rows it stands for.

After every step of a run with rejections (a draft model that disagrees with the target) and
refills (more rows than slots), each live row's slot must hold: the completion token counts
recomputed from the row's own tokens, its prompt mask and token history, its position, length
and last token, its stop and ban masks and sampling parameters.  The sparse penalties (history
and proposals only) must equal the dense reference of specbatch.sampling.warping, and the stop-string
window carried across steps must find what the whole-completion scan finds.
"""

from __future__ import annotations

import random

import pytest
import torch

from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.engine.request import Request
from specbatch.engine.rows import Row
from specbatch.engine.slots import SlotState
from specbatch.engine.tokenization import StopStringMatcher, StopWindow
from specbatch.models import load_model, load_tokenizer
from specbatch.sampling.warping import History, SamplingParams, WarpParams, apply_bias_and_penalties
from tests.tiny import EOS_ID, make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target, draft = make_tiny_pair(tmp_path_factory.mktemp("slots"), vocab_size=V, draft_vocab_size=V)
    return load_model(target, dtype="float32"), load_model(draft, dtype="float32"), load_tokenizer(target)


def _expected_row_state(engine: Engine, row) -> dict[str, torch.Tensor]:
    v = engine.vocab_size
    completion = torch.tensor(row.completion, dtype=torch.int64)
    prompt = torch.tensor(row.tokens[: row.num_prompt], dtype=torch.int64)
    stop = set(row.params.stop_token_ids) | (set() if row.params.ignore_eos else engine.eos_ids)
    ban = set(row.params.stop_token_ids) | engine.eos_ids
    return {
        "counts": torch.bincount(completion, minlength=v).to(torch.float32),
        "prompt_seen": torch.bincount(prompt, minlength=v) > 0,
        "stop_ids": torch.isin(torch.arange(v), torch.tensor(sorted(stop), dtype=torch.int64)),
        "ban_ids": torch.isin(torch.arange(v), torch.tensor(sorted(ban), dtype=torch.int64)),
    }


def test_slot_state_matches_the_rows_after_rejections_and_refills(models):
    target, draft, tokenizer = models
    pen = SamplingParams(n=12, max_new_tokens=10, temperature=1.0, seed=5, repetition_penalty=1.3,
                         presence_penalty=0.7, frequency_penalty=0.4, min_new_tokens=3, stop_token_ids=(9,),
                         top_k=20, logit_bias={4: 1.5, 7: -2.0})
    plain = SamplingParams(n=6, max_new_tokens=8, temperature=0.7, seed=5, ignore_eos=True)
    requests = [Request("a", [1, 10, 11, 12, 10, 11], pen), Request("b", [1, 14, 15], plain),
                Request("c", [1, 12, 13, 12], pen, forced_prefix=[13, 12])]
    engine = Engine(target, tokenizer, ModelDrafter(draft, V),
                    EngineConfig(max_batch_size=5, num_draft_tokens=3, measure_cost=False))
    state = engine.slot_state
    real_step = engine._step
    checked = {"rows": 0, "steps": 0, "slots": set()}

    def step_and_check(rows):
        real_step(rows)
        checked["steps"] += 1
        for row in rows:
            s = row.slot
            n = len(row.tokens)
            assert int(state.position[s]) == row.position and int(state.length[s]) == n
            assert int(state.last_token[s]) == row.tokens[-1]
            assert state.history[s, :n].tolist() == row.tokens
            assert int(state.key[s]) == row.key and int(state.sample_index[s]) == row.sample_index
            assert int(state.min_new_tokens[s]) == row.params.min_new_tokens
            for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
                assert float(state.warp[name][s]) == pytest.approx(getattr(row.params, name))
            assert int(state.warp["top_k"][s]) == row.params.top_k
            want = _expected_row_state(engine, row)
            assert torch.equal(state.counts[s], want["counts"]), (row.request.request_id, row.sample_index)
            assert torch.equal(state.prompt_seen[s], want["prompt_seen"])
            assert torch.equal(state.stop_ids[s], want["stop_ids"])
            assert torch.equal(state.ban_ids[s], want["ban_ids"])
            bias = dict(zip(state.bias_ids[s].tolist(), state.bias_values[s].tolist()))
            assert {t: b for t, b in bias.items() if b} == row.params.logit_bias
            checked["rows"] += 1
            checked["slots"].add(s)

    engine._step = step_and_check
    with torch.inference_mode():
        outputs = engine.generate(requests)
    assert not [o.error for o in outputs if o.error]
    assert sum(len(r.indices()) for r in requests) > 5 and len(checked["slots"]) == 5  # every slot was refilled
    assert engine.stats.tested > engine.stats.accepted > 0  # steps with rejections
    assert checked["steps"] > 10 and checked["rows"] > 50
    assert [o.token_ids[:2] for o in outputs if o.request_id == "c"] == [[13, 12]] * 12  # forced prefix counted


def test_sparse_penalties_equal_the_dense_reference(models):
    """SlotState.adjust (penalties on history and proposals, bias, bans) equals
    apply_bias_and_penalties over the whole vocabulary with per-position histories."""
    torch.manual_seed(0)
    r, g, v = 6, 3, V
    state = SlotState(8, v, "cpu", {EOS_ID}, max_tokens=40)
    params = [SamplingParams(repetition_penalty=1.0 + 0.2 * i, presence_penalty=0.3 * (i % 3),
                             frequency_penalty=0.25 * (i % 2), logit_bias={3: 0.5 * i} if i % 2 else {},
                             min_new_tokens=4 if i < 3 else 0)
              for i in range(r)]
    rows = []
    for i, p in enumerate(params):
        prompt = torch.randint(3, v, (5 + i,)).tolist()
        completion = torch.randint(3, v, (i,)).tolist()
        rows.append(Row(request=Request(f"r{i}", prompt, p), sample_index=i, slot=7 - i, key=3,
                        tokens=prompt + completion, num_prompt=len(prompt), capacity=len(prompt) + len(completion)))
    for row in rows:
        state.admit([row])
    batch = state.batch(rows)
    draft = torch.randint(3, v, (r, g))
    draft[0, 1:] = -1  # ragged proposals
    draft[1] = -1
    logits = torch.randn(r, g + 1, v) * 3
    position = torch.tensor([row.position for row in rows])
    ours = state.adjust(logits, batch, draft, position, ban=True, history_len=max(len(row.tokens) for row in rows))

    for i, row in enumerate(rows):
        for j in range(g + 1):
            seq = row.completion + [t for t in draft[i, :j].tolist() if t >= 0]
            history = History(prompt_ids=torch.tensor([row.tokens[: row.num_prompt]]),
                              output_ids=torch.tensor([seq or [-1]]))
            want = apply_bias_and_penalties(logits[i, j][None], WarpParams.from_params([row.params]), history)[0]
            if row.position + j < row.params.min_new_tokens:
                want[EOS_ID] = float("-inf")
            assert torch.equal(ours[i, j], want), (i, j)


@pytest.mark.parametrize("stops", [["c d"], ["e", "b c d e f"], ["a b"]])
def test_stop_window_finds_what_the_whole_completion_scan_finds(models, stops):
    _, _, tokenizer = models
    matcher = StopStringMatcher(tokenizer, stops)
    rng = random.Random(1)
    found = 0
    for trial in range(60):
        window, ids = StopWindow(), []
        while len(ids) < 80:
            new = [rng.randrange(7, 12) for _ in range(rng.randint(1, 4))]  # words a..e: stops occur
            whole = matcher.find(ids + new, len(new), None)
            exact = _scan(matcher, ids + new, len(new))
            assert whole == exact
            assert matcher.find(ids + new, len(new), window) == exact
            if exact is not None:
                found += 1
                break
            ids += new
    assert found > 20


def _scan(matcher: StopStringMatcher, ids: list[int], num_new: int):
    """The definition: decode the whole completion after each new token."""
    before = len(ids) - num_new
    prev_len = len(matcher.decode(ids[:before]))
    for k in range(1, num_new + 1):
        text = matcher.decode(ids[: before + k])
        hits = [(text.find(s, max(0, prev_len - matcher.longest + 1)), s) for s in matcher.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            return k, min(hits)[1]
    return None
