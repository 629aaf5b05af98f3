"""Choosing a backend: what the transformers backend cannot run is refused by the preflight in one
line naming the architecture and why; auto picks native for the Llama family; each model's
backend setting reaches the loader, the worker's engine and the model drafter."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch.cli import main
from specbatch.models import CheckpointError, load_model
from specbatch.models.backends import choose_backend
from specbatch.models.hf_backend import TransformersModel
from specbatch.models.llama import LlamaModel
from specbatch.jobs.spec import spec_from_dict
from tests.tiny import make_tiny_checkpoint
from tests.tiny_hf import make_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> pathlib.Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama") / "m", vocab_size=32)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> pathlib.Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("gemma") / "m", "gemma2", vocab_size=32)


def _config_only(root: pathlib.Path, name: str, donor: pathlib.Path, config: dict) -> pathlib.Path:
    """A checkpoint directory with the donor's weights and tokenizer but this config.json."""
    path = root / name
    shutil.copytree(donor, path)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _hf_config(cls_name: str, **kw) -> dict:
    import transformers

    config = getattr(transformers, cls_name)(**kw)
    return config.to_dict()


def validate(tmp: pathlib.Path, model: pathlib.Path, capsys, **target) -> tuple[int, str]:
    inp = tmp / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a b"]}), inp)
    spec = {"name": "hf", "input": {"path": str(inp)}, "output": {"path": str(tmp / "out")},
            "models": {"target": {"path": str(model), "dtype": "float32", **target}},
            "sampling": {"max_new_tokens": 8}}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    code = main(["validate", str(tmp / "job.yaml")])
    return code, capsys.readouterr().err.strip()


def refusal(tmp, model, capsys, **target) -> str:
    code, err = validate(tmp, model, capsys, **target)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: models.target.path: "), err
    return err


def test_encoder_decoder_is_refused(tmp_path, gemma, capsys):
    t5 = _hf_config("T5Config", vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    t5["architectures"] = ["T5ForConditionalGeneration"]
    err = refusal(tmp_path, _config_only(tmp_path, "t5", gemma, t5), capsys)
    assert "architecture T5ForConditionalGeneration is an encoder-decoder model" in err


def test_remote_code_is_refused(tmp_path, gemma, capsys):
    config = json.loads((gemma / "config.json").read_text())
    custom = {**config, "architectures": ["MyOwnForCausalLM"], "model_type": "my_own",
              "auto_map": {"AutoModelForCausalLM": "modeling_my_own.MyOwnForCausalLM"}}
    err = refusal(tmp_path, _config_only(tmp_path, "remote", gemma, custom), capsys)
    assert "architecture MyOwnForCausalLM needs remote code (config.json's auto_map), which is never run" in err


def test_an_auto_map_beside_a_shipped_architecture_runs_transformers_own_code(tmp_path, gemma, capsys):
    config = json.loads((gemma / "config.json").read_text())
    shipped = {**config, "auto_map": {"AutoModelForCausalLM": "modeling_gemma2.Gemma2ForCausalLM"}}
    path = _config_only(tmp_path, "shipped", gemma, shipped)
    assert validate(tmp_path, path, capsys)[0] == 0
    assert isinstance(load_model(path), TransformersModel)


def test_an_architecture_without_the_attention_interface_is_refused(tmp_path, gemma, capsys):
    bloom = _hf_config("BloomConfig", vocab_size=32, hidden_size=16, n_layer=1, n_head=2)
    bloom["architectures"] = ["BloomForCausalLM"]
    err = refusal(tmp_path, _config_only(tmp_path, "bloom", gemma, bloom), capsys)
    assert "architecture BloomForCausalLM: its transformers code does not support the attention interface" in err
    with pytest.raises(CheckpointError, match="BloomForCausalLM"):
        load_model(tmp_path / "bloom")


def test_an_unknown_architecture_is_refused(tmp_path, gemma, capsys):
    config = {**json.loads((gemma / "config.json").read_text()), "architectures": ["NoSuchForCausalLM"]}
    err = refusal(tmp_path, _config_only(tmp_path, "unknown", gemma, config), capsys)
    assert "architecture NoSuchForCausalLM is unknown to transformers" in err


def test_native_refuses_a_non_llama_architecture(tmp_path, gemma, capsys):
    err = refusal(tmp_path, gemma, capsys, backend="native")
    assert "unsupported architecture 'Gemma2ForCausalLM'" in err


def test_compile_is_native_only(tmp_path, gemma, capsys):
    code, err = validate(tmp_path, gemma, capsys, compile=True)
    assert code == 2 and "models.target.compile: only the native backend compiles; Gemma2ForCausalLM" in err


def test_cuda_graphs_are_native_only(tmp_path, gemma, capsys):
    code, err = validate(tmp_path, gemma, capsys, cuda_graphs=True)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "models.target.cuda_graphs: only the native backend runs CUDA graphs; Gemma2ForCausalLM" in err


def test_auto_picks_native_for_llama_and_transformers_otherwise(llama, gemma, tmp_path, capsys):
    assert choose_backend(llama) == "native" and choose_backend(gemma) == "transformers"
    assert isinstance(load_model(llama), LlamaModel)
    assert isinstance(load_model(llama, backend="transformers"), TransformersModel)
    assert isinstance(load_model(gemma), TransformersModel)
    assert validate(tmp_path, gemma, capsys)[0] == 0
    assert validate(tmp_path, llama, capsys, backend="transformers")[0] == 0


def test_the_backend_setting_is_per_model_and_keeps_old_fingerprints():
    base = {"name": "x", "input": {"path": "in.parquet"}, "output": {"path": "out"},
            "models": {"target": {"path": "m"}, "draft": {"kind": "model", "path": "d"}}}
    default = spec_from_dict(base)
    assert default.models.target.backend == "auto" and default.models.draft.backend == "auto"
    explicit = spec_from_dict({**base, "models": {"target": {"path": "m", "backend": "transformers"},
                                                  "draft": {"kind": "model", "path": "d", "backend": "native"}}})
    assert explicit.fingerprint() != default.fingerprint()
    # A default spec hashes as it did before the field existed.
    d = default.model_dump(mode="json", exclude={"name", "output", "resources"})
    for role in ("target", "draft"):
        del d["models"][role]["backend"]
    del d["models"]["target"]["cuda_graphs"]
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert default.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    with pytest.raises(Exception, match="backend: only for kind 'model'"):
        spec_from_dict({**base, "models": {"target": {"path": "m"}, "draft": {"kind": "ngram", "backend": "native"}}})


def test_build_engine_and_the_model_drafter_take_each_models_backend(tmp_path, gemma):
    from specbatch.engine.drafting.model import ModelDrafter
    from specbatch.engine.request import Request
    from specbatch.sampling.warping import SamplingParams
    from specbatch.jobs.build import build_engine

    draft = make_tiny_hf_checkpoint(tmp_path / "draft", "gemma2", vocab_size=32, seed=3)
    spec = spec_from_dict({
        "name": "hf", "input": {"path": "in.parquet"}, "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(gemma), "dtype": "float32"},
                   "draft": {"kind": "model", "path": str(draft), "backend": "transformers"}},
        "sampling": {"n": 2, "max_new_tokens": 4, "seed": 1}, "speculative": {"num_draft_tokens": 2},
        "resources": {"max_batch_size": 4},
    })
    loaded = build_engine(spec, measure_cost=False)
    assert loaded.description["backend"] == "TransformersModel"
    assert isinstance(loaded.engine.drafter, ModelDrafter) and isinstance(loaded.engine.drafter.model, TransformersModel)
    import torch

    with torch.inference_mode():
        outs = loaded.engine.generate([Request("r", loaded.encode("a b c"), SamplingParams(n=2, max_new_tokens=4, seed=1))])
    assert len(outs) == 2 and all(o.error is None and 1 <= len(o.token_ids) <= 4 for o in outs)
    assert loaded.engine.stats.tested > 0
