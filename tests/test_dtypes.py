"""dtype 'auto': the device's native dtype, decided once per engine for the target and the model
drafter, named in stats.json; explicit dtypes pass through unchanged."""

from __future__ import annotations

import pytest
import torch

from specbatch.jobs.spec import spec_from_dict
from specbatch.models import dtypes
from specbatch.models.dtypes import cpu_has_native_bfloat16, resolve_dtype
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    return make_tiny_checkpoint(root / "target", vocab_size=32), make_tiny_checkpoint(root / "draft", vocab_size=32, seed=5)


def test_explicit_dtypes_pass_through_and_unknown_ones_are_refused():
    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype("float32", "cuda") == "float32"
    assert resolve_dtype(torch.bfloat16, "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("native, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_is_bfloat16_only_where_it_is_native(monkeypatch, native, want):
    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", torch.device("cpu")) == want


@pytest.mark.parametrize("bf16, want", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_a_gpu_is_bfloat16_or_float16_on_older_gpus(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", "cuda") == want


def test_the_cpu_check_agrees_with_onednn_s_bfloat16_kernels():
    """The check says what oneDNN does: it packs a bfloat16 weight only where it has bfloat16 kernels."""
    weight = torch.randn(8, 16).to(torch.bfloat16)
    if cpu_has_native_bfloat16():
        torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(weight, 1)


@pytest.mark.parametrize("native", [True, False])
def test_build_engine_resolves_auto_once_for_the_target_and_the_model_drafter(monkeypatch, tmp_path, checkpoints, native):
    from specbatch.jobs.build import build_engine

    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)
    target, draft = checkpoints
    spec = spec_from_dict({
        "name": "dtypes", "input": {"path": "in.parquet"}, "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(target)}, "draft": {"kind": "model", "path": str(draft)}},
        "sampling": {"n": 2, "max_new_tokens": 4, "seed": 1}, "speculative": {"num_draft_tokens": 2},
        "resources": {"max_batch_size": 4},
    })
    assert spec.models.target.dtype == "auto" and spec.models.draft.dtype is None
    loaded = build_engine(spec, measure_cost=False)
    want = torch.bfloat16 if native else torch.float32
    assert loaded.description["dtype"] == str(want).removeprefix("torch.")
    assert loaded.engine.target.dtype == want and loaded.engine.drafter.model.dtype == want
