"""`specbatch audit`: passes on a correct engine, fails (exit 1) on a broken sampling path.

Tiny checkpoint pair (32-token vocabulary) and a tiny Parquet input written here; the audit runs
in-process through `specbatch.cli.main`, so a mutant patched into the real code path applies.
"""

from __future__ import annotations

import pathlib
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from specbatch.jobs import audit
from specbatch.cli import main
from specbatch.engine.drafting.model import ModelDrafter
from tests.tiny import make_tiny_pair

SAMPLES = "600"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("pair"), logit_scale=6.0)


def write_job(tmp_path: pathlib.Path, pair, draft: dict, sampling: dict | None = None) -> str:
    target, _ = pair
    inp = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a b c d a b", "z y x"]}), inp)
    spec = {
        "name": "audit-job",
        "input": {"path": str(inp), "chat_template": False},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(target), "dtype": "float32"}, "draft": draft},
        "sampling": {"n": 2, "max_new_tokens": 16, "temperature": 1.0, **(sampling or {})},
        "speculative": {"num_draft_tokens": 3},
        "resources": {"actors": 1, "gpus_per_actor": 0, "max_batch_size": 128},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def model_draft(pair) -> dict:
    return {"kind": "model", "path": str(pair[1])}


def audit_output(job: str, capsys, expected_code: int) -> str:
    """Run the audit in-process; assert its exit code; return its report."""
    code = main(["audit", job, "--prompts", "1", "--prefix-lengths", "0,3", "--samples", SAMPLES])
    out = capsys.readouterr().out
    print(out)  # the audit's table, shown with pytest -rA
    assert code == expected_code, out
    return out


def test_audit_passes_with_model_drafter(tmp_path, pair, capsys):
    out = audit_output(write_job(tmp_path, pair, model_draft(pair), {"top_k": 20, "min_new_tokens": 2}), capsys, 0)
    assert "audit: PASS (6 checks, 0 failed" in out
    assert "rejected" in out  # the drafter's proposals were tested and some rejected: power


def test_audit_passes_with_ngram_drafter_and_penalties(tmp_path, pair, capsys):
    job = write_job(tmp_path, pair, {"kind": "ngram"}, {"presence_penalty": 2.0, "repetition_penalty": 1.3})
    out = audit_output(job, capsys, 0)
    assert "audit: PASS" in out


def test_audit_fails_when_the_drafter_reports_another_q(tmp_path, pair, capsys):
    """Mutant: the model drafter samples from q but reports q sharpened (another warp)."""
    original = ModelDrafter.propose

    def reports_other_q(self, rows, max_proposals, coupled):
        proposal = original(self, rows, max_proposals, coupled)
        if proposal.q is not None and proposal.q.numel():
            sharp = proposal.q ** 2
            proposal.q = sharp / sharp.sum(-1, keepdim=True).clamp(min=1e-30)
        return proposal

    with mock.patch.object(ModelDrafter, "propose", reports_other_q):
        out = audit_output(write_job(tmp_path, pair, model_draft(pair)), capsys, 1)
    assert "audit: FAIL" in out


def test_audit_fails_when_penalties_ignore_earlier_proposals(tmp_path, pair, capsys):
    """Mutant (issue 11): the penalty history of position j lacks the proposals before j."""
    from specbatch.engine.engine import Engine

    original = Engine._history

    def history_without_proposals(self, rows, draft_tokens):
        return original(self, rows, torch.full_like(draft_tokens, -1))

    job = write_job(tmp_path, pair, model_draft(pair), {"presence_penalty": 3.0})
    with mock.patch.object(Engine, "_history", history_without_proposals):
        out = audit_output(job, capsys, 1)
    assert "audit: FAIL" in out
    assert any(" rep " in line and line.endswith("FAIL") for line in out.splitlines())  # too many repeats


def test_binned_test_pools_rare_cells_and_handles_near_certain_cells():
    probs = torch.tensor([0.5, 0.3, 0.199, 0.001])
    counts = torch.tensor([500, 300, 199, 1])
    stat, dof, bins, p, test = audit.binned_test(probs, counts, 0.0, 0)
    assert (test, bins, dof) == ("chi2", 3, 2) and p > 0.9  # the 0.001 cell merged into the smallest bin
    # A one-hot distribution (greedy): a handful of other tokens fail, one does not.
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    assert audit.binned_test(one_hot, torch.tensor([999, 1, 0]), 0.0, 0)[3] > 0.2
    assert audit.binned_test(one_hot, torch.tensor([990, 10, 0]), 0.0, 0)[3] < 1e-6


def test_bad_options_and_specs_exit_2(tmp_path, pair, capsys):
    job = write_job(tmp_path, pair, {"kind": "ngram"})
    assert main(["audit", job, "--samples", "3"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["audit", job, "--set", "sampling.top_p=7"]) == 2
    assert "sampling.top_p" in capsys.readouterr().err


def test_forced_prefix_continues_a_sample_exactly(pair):
    """Forcing a sample's own first k tokens reproduces the rest of it: the prefix sits at
    completion positions 0..k-1 (random numbers, penalties and min_new_tokens see it there)."""
    from specbatch.engine.engine import Engine, EngineConfig
    from specbatch.models import load_model, load_tokenizer
    from specbatch.engine.request import Request
    from specbatch.sampling.warping import SamplingParams

    target, tokenizer = load_model(pair[0], dtype="float32"), load_tokenizer(pair[0])
    engine = Engine(target, tokenizer, None, EngineConfig(max_batch_size=8, measure_cost=False))
    params = SamplingParams(n=6, max_new_tokens=10, min_new_tokens=5, presence_penalty=1.5, seed=3)
    prompt = [1, 10, 11, 12, 10, 11]
    full = engine.generate([Request("p", prompt, params)])
    for out in full:
        k = min(3, len(out.token_ids) - 1)
        forced = engine.generate([Request("p", prompt, params, sample_indices=[out.sample_index],
                                          forced_prefix=out.token_ids[:k])])[0]
        assert forced.token_ids == out.token_ids
        assert forced.num_prompt_tokens == len(prompt)


def test_huge_sample_counts_and_audits_without_checks_exit_2(tmp_path, pair, capsys):
    """--samples 99999999999 is refused before any model loads; an audit whose every prefix is
    skipped has no verdict (it printed FAIL with p = nan): one line, exit 2."""
    job = write_job(tmp_path, pair, {"kind": "ngram"})
    assert main(["audit", job, "--samples", "99999999999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --samples must be between 10 and 1000000, got 99999999999"], err
    assert main(["audit", job, "--prompts", "1", "--prefix-lengths", "16", "--samples", "10"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no check could run on the audited prompts (1 skipped; first: "), lines
    assert "audit: FAIL" not in captured.out
