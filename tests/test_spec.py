"""The job spec: loading, overrides, validation errors (one line naming the field), sweeps, fingerprint."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from specbatch.sampling.warping import SamplingParams
from specbatch.jobs.spec import (
    JobSpec,
    SpecError,
    apply_override,
    load_spec,
    point_key,
    reference_markdown,
    spec_from_dict,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

MINIMAL = """\
name: t
input: {path: prompts.parquet}
output: {path: out/t}
models:
  target: {path: tiny}
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "job.yaml") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def minimal_dict() -> dict:
    return yaml.safe_load(MINIMAL)


def test_minimal_spec_takes_the_documented_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.input.prompt_column == "prompt" and spec.input.id_column == "auto"
    assert spec.input.chat_template == "auto" and spec.input.keep_columns == []
    assert spec.output.if_exists == "resume"
    assert spec.models.target.dtype == "auto" and spec.models.target.max_model_len is None
    assert spec.models.draft.kind == "ngram" and (spec.models.draft.min_n, spec.models.draft.max_n) == (1, 3)
    assert spec.speculative.num_draft_tokens == 4 and spec.speculative.verification == "rejection"
    assert spec.resources.actors == "auto" and spec.resources.shard_rows == 256
    assert spec.sweep is None


def test_full_issue_shape_loads(tmp_path):
    text = """\
name: brainstorm
input:  {path: jobs/data/prompts.parquet, prompt_column: prompt, id_column: id, chat_template: auto, keep_columns: []}
output: {path: out/brainstorm, if_exists: resume}
models:
  target: {path: smollm2-135m-instruct, dtype: bfloat16, max_model_len: null}
  draft:  {kind: ngram, min_n: 1, max_n: 3}
sampling: {n: 8, max_new_tokens: 256, min_new_tokens: 0, ignore_eos: false, temperature: 0.8, top_k: 0, top_p: 1.0, min_p: 0.0,
           repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, stop: [], seed: 0}
speculative: {num_draft_tokens: 4, draft_temperature: null, draft_top_k: 0, draft_top_p: 1.0}
resources: {actors: auto, gpus_per_actor: 1, cpus_per_actor: 1, max_batch_size: 32, shard_rows: 256}
"""
    spec = load_spec(write(tmp_path, text))
    assert spec.sampling.n == 8 and spec.sampling.temperature == 0.8
    assert spec.resources.gpus_per_actor == 1


def test_spec_is_frozen(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        spec.sampling.n = 3  # type: ignore[misc]


# Each case: YAML text of a whole spec (or None: MINIMAL + overrides), overrides, and the text
# the one-line error must start with.
MALFORMED = [
    ("yaml syntax", "name: t\ninput: {path: [unclosed\n", (), "job.yaml:"),
    ("not a mapping", "- a\n- b\n", (), "job.yaml: expected a mapping"),
    ("empty file", "", (), "job.yaml: empty file"),
    ("unsafe yaml tag", MINIMAL + "extra: !!python/object/apply:os.system ['true']\n", (), "job.yaml:"),
    ("duplicate key", MINIMAL + "sampling: {n: 2}\nsampling: {n: 3}\n", (), "job.yaml:7:1: YAML syntax error: duplicate key 'sampling'"),
    ("duplicate nested key", MINIMAL + "sampling: {n: 2, n: 3}\n", (), "job.yaml:6:18: YAML syntax error: duplicate key 'n'"),
    ("top-level typo", MINIMAL + "samplng: {n: 2}\n", (), "samplng: unknown field (did you mean 'sampling'?)"),
    ("nested typo", MINIMAL + "sampling: {temprature: 0.5}\n", (), "sampling.temprature: unknown field (did you mean 'temperature'?)"),
    ("deep typo", None, ("models.target.dtyp=float32",), "models.target.dtyp: unknown field (did you mean 'dtype'?)"),
    ("missing section", "name: t\ninput: {path: a}\noutput: {path: o}\n", (), "models: required field is missing"),
    ("missing field", "name: t\ninput: {prompt_column: p}\noutput: {path: o}\nmodels: {target: {path: m}}\n", (), "input.path: required"),
    ("string for int", None, ("sampling.n=four",), "sampling.n: Input should be a valid integer, got 'four'"),
    ("quoted number for int", None, ("sampling.n='4'",), "sampling.n: Input should be a valid integer"),
    ("bool for int", None, ("sampling.max_new_tokens=true",), "sampling.max_new_tokens: Input should be a valid integer"),
    ("top_p out of range", None, ("sampling.top_p=1.5",), "sampling.top_p: Input should be less than or equal to 1, got 1.5"),
    ("top_p zero", None, ("sampling.top_p=0",), "sampling.top_p: Input should be greater than 0"),
    ("negative temperature", None, ("sampling.temperature=-0.1",), "sampling.temperature: Input should be greater than or equal to 0"),
    ("min > max new tokens", None, ("sampling.min_new_tokens=10", "sampling.max_new_tokens=5"), "sampling.min_new_tokens: must be <= max_new_tokens"),
    ("stop not a list", None, ("sampling.stop=END",), "sampling.stop: Input should be a valid list"),
    ("empty stop string", None, ("sampling.stop=['']",), "sampling.stop: stop strings must not be empty"),
    ("if_exists typo", None, ("output.if_exists=overwite",), "output.if_exists: Input should be 'resume', 'overwrite' or 'fail', got 'overwite' (did you mean 'overwrite'?)"),
    ("dtype typo", None, ("models.target.dtype=bfloat",), "models.target.dtype:"),
    ("draft kind typo", None, ("models.draft.kind=ngam",), "models.draft.kind: Input should be 'none', 'ngram', 'model' or 'suffix', got 'ngam' (did you mean 'ngram'?)"),
    ("model draft without path", None, ("models.draft.kind=model",), "models.draft.path: required when kind is 'model'"),
    ("top_m on an ngram draft", None, ("models.draft.top_m=4",), "models.draft.top_m: only for kind 'suffix'"),
    ("num_draft_tokens word", None, ("speculative.num_draft_tokens=many",), "speculative.num_draft_tokens: must be 'auto' or an integer"),
    ("path on an ngram draft", None, ("models.draft.path=some/model",), "models.draft.path: only for kind 'model'"),
    ("ngram min_n > max_n", None, ("models.draft.min_n=4",), "models.draft.min_n: must be <= max_n (3), got 4"),
    ("max_model_len zero", None, ("models.target.max_model_len=0",), "models.target.max_model_len: Input should be greater than 0"),
    ("compile not a bool", None, ("models.target.compile=sometimes",), "models.target.compile: Input should be a valid boolean, got 'sometimes'"),
    ("negative gamma", None, ("speculative.num_draft_tokens=-1",), "speculative.num_draft_tokens:"),
    ("verification typo", None, ("speculative.verification=couple",), "speculative.verification:"),
    ("actors zero", None, ("resources.actors=0",), "resources.actors: must be 'auto' or an integer in [1, 10000], got 0"),
    ("actors word", None, ("resources.actors=many",), "resources.actors: must be 'auto' or an integer in [1, 10000], got 'many'"),
    ("shard_rows zero", None, ("resources.shard_rows=0",), "resources.shard_rows: Input should be greater than or equal to 1"),
    ("negative gpus", None, ("resources.gpus_per_actor=-1",), "resources.gpus_per_actor:"),
    ("chat_template word", None, ("input.chat_template=yes please",), "input.chat_template: must be true, false or 'auto'"),
    ("keep an output column", None, ("input.keep_columns=[prompt]",), "input.keep_columns: 'prompt' is an output column"),
    ("keep a column twice", None, ("input.keep_columns=[a, a]",), "input.keep_columns: 'a' is listed twice"),
    ("empty input path", None, ("input.path=' '",), "input.path: must not be empty"),
    ("sweep typo", None, ("sweep.temprature=[0.5, 1.0]",), "sweep.temprature: not a sweepable sampling field (did you mean 'temperature'?)"),
    ("sweep of n", None, ("sweep.n=[1, 2]",), "sweep.n: not a sweepable sampling field"),
    ("sweep bad value", None, ("sweep.temperature=[0.5, hot]",), "sweep.temperature[1]: Input should be a valid number, got 'hot'"),
    ("sweep out of range", None, ("sweep.top_p=[0.5, 2.0]",), "sweep.top_p[1]: Input should be less than or equal to 1"),
    ("sweep key kept from input", None, ("sweep.top_k=[1, 2]", "input.keep_columns=[top_k]"), "sweep.top_k: also in input.keep_columns"),
    ("sweep empty", None, ("sweep.temperature=[]",), "sweep.temperature: needs at least one value"),
    ("sweep duplicate", None, ("sweep.temperature=[0.5, 0.5]",), "sweep.temperature: values must be distinct"),
    ("section not a mapping", "name: t\ninput: {path: a}\noutput: {path: o}\nmodels: gpt\n", (), "models: Input should be a valid dictionary"),
]


@pytest.mark.parametrize("case,text,overrides,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_spec_fails_with_one_line_naming_the_field(tmp_path, case, text, overrides, expected):
    path = write(tmp_path, MINIMAL if text is None else text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert "Traceback" not in message
    shown = message.replace(str(path), "job.yaml")
    assert shown.startswith(expected), shown


def test_missing_spec_file_names_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_path_that_is_a_directory(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, "name: t\ninput:\n  path: a\n   bad: indent\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:4:")
    assert "YAML syntax error" in str(info.value)


@pytest.mark.parametrize(
    "item",
    ["sampling.temperature", "=3", "sampling..n=2", ".n=2", "sampling.n.=2", "sampling.stop=[unclosed"],
)
def test_bad_override_syntax(tmp_path, item):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, MINIMAL), [item])
    assert str(info.value).startswith(f"--set {item!r}:")
    assert "\n" not in str(info.value)


def test_override_into_a_scalar_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"--set 'name.x=1': name is not a mapping"):
        load_spec(write(tmp_path, MINIMAL), ["name.x=1"])


def test_overrides_parse_as_yaml_scalars(tmp_path):
    spec = load_spec(
        write(tmp_path, MINIMAL),
        [
            "sampling.temperature=0.5",
            "sampling.n=3",
            "sampling.ignore_eos=true",
            "sampling.stop=[END, '###']",
            "models.target.max_model_len=2048",
            "input.id_column=null",
            "output.path=s3://bucket/out",
            "resources.actors=2",
            "models.draft={kind: none}",
            "speculative.draft_temperature=0",
        ],
    )
    assert spec.sampling.temperature == 0.5 and isinstance(spec.sampling.temperature, float)
    assert spec.sampling.n == 3 and spec.sampling.ignore_eos is True
    assert spec.sampling.stop == ["END", "###"]
    assert spec.models.target.max_model_len == 2048
    assert spec.input.id_column is None
    assert spec.output.path == "s3://bucket/out"
    assert spec.resources.actors == 2
    assert spec.models.draft.kind == "none"
    assert spec.speculative.draft_temperature == 0.0


def test_override_creates_missing_sections_and_later_wins(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL), ["sampling.seed=7", "sampling.seed=9", "speculative.verification=coupled"])
    assert spec.sampling.seed == 9 and spec.speculative.verification == "coupled"


def test_apply_override_does_not_mutate_its_input():
    data = minimal_dict()
    out = apply_override(data, "sampling.n=2")
    assert "sampling" not in data and out["sampling"] == {"n": 2}


def test_integer_where_float_expected_is_accepted(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL), ["sampling.temperature=1", "sampling.top_p=1"])
    assert spec.sampling.temperature == 1.0 and isinstance(spec.sampling.temperature, float)


def test_model_draft_with_path_and_dtype():
    d = minimal_dict()
    d["models"]["draft"] = {"kind": "model", "path": "llama-1b", "dtype": "float16"}
    spec = spec_from_dict(d)
    assert spec.models.draft.path == "llama-1b" and spec.models.draft.dtype == "float16"


def test_to_params_matches_sampling_params():
    d = minimal_dict()
    d["sampling"] = {"n": 4, "temperature": 0.7, "top_k": 20, "stop": ["\n\n"], "stop_token_ids": [5], "logit_bias": {3: -1.5}, "seed": 11}
    params = spec_from_dict(d).sampling.to_params()
    assert params == SamplingParams(n=4, temperature=0.7, top_k=20, stop=("\n\n",), stop_token_ids=(5,), logit_bias={3: -1.5}, seed=11)


def test_sweep_points_are_the_grid_in_key_order():
    d = minimal_dict()
    d["sampling"] = {"n": 2, "temperature": 0.9}
    d["sweep"] = {"temperature": [0.5, 1.0], "top_k": [0, 5, 50]}
    points = spec_from_dict(d).sweep_points()
    assert [p for p, _ in points] == [
        {"temperature": t, "top_k": k} for t in (0.5, 1.0) for k in (0, 5, 50)
    ]
    for point, params in points:
        assert params.temperature == point["temperature"] and params.top_k == point["top_k"] and params.n == 2


def test_integer_sweep_values_of_float_fields_become_floats():
    a = spec_from_dict(apply_override(minimal_dict(), "sweep.temperature=[0, 1]"))
    b = spec_from_dict(apply_override(minimal_dict(), "sweep.temperature=[0.0, 1.0]"))
    assert a.sweep == {"temperature": [0.0, 1.0]} and all(isinstance(x, float) for x in a.sweep["temperature"])
    assert a.fingerprint() == b.fingerprint()
    assert [point_key(p) for p, _ in a.sweep_points()] == [point_key(p) for p, _ in b.sweep_points()]
    c = spec_from_dict(apply_override(minimal_dict(), "sweep.top_k=[0, 5]"))
    assert c.sweep == {"top_k": [0, 5]} and all(type(x) is int for x in c.sweep["top_k"])
    with pytest.raises(SpecError, match=r"sweep.temperature: values must be distinct"):
        spec_from_dict(apply_override(minimal_dict(), "sweep.temperature=[1, 1.0]"))


def test_no_sweep_is_one_empty_point():
    spec = spec_from_dict(minimal_dict())
    [(point, params)] = spec.sweep_points()
    assert point == {} and params == spec.sampling.to_params()
    assert point_key(point) == ""


def test_point_key_is_canonical():
    assert point_key({"top_k": 5, "temperature": 0.5}) == point_key({"temperature": 0.5, "top_k": 5})
    assert point_key({"temperature": 0.5}) != point_key({"temperature": 1.0})


def test_fingerprint_ignores_name_output_and_resources():
    base = spec_from_dict(minimal_dict())
    same = [
        ["name=other"],
        ["output.path=elsewhere", "output.if_exists=overwrite"],
        ["resources.actors=4", "resources.shard_rows=3", "resources.max_batch_size=2", "resources.gpus_per_actor=0"],
    ]
    for overrides in same:
        d = minimal_dict()
        for o in overrides:
            d = apply_override(d, o)
        assert spec_from_dict(d).fingerprint() == base.fingerprint(), overrides
    different = ["sampling.seed=1", "sampling.temperature=0.5", "input.path=other.parquet", "models.target.dtype=float32",
                 "models.draft.kind=none", "speculative.num_draft_tokens=2", "sweep.temperature=[0.5]"]
    prints = {base.fingerprint()}
    for o in different:
        fp = spec_from_dict(apply_override(minimal_dict(), o)).fingerprint()
        assert fp not in prints, o
        prints.add(fp)


def test_yaml_dump_round_trips(tmp_path):
    d = minimal_dict()
    d["sweep"] = {"temperature": [0.5, 1.0]}
    d["models"]["draft"] = {"kind": "none"}
    spec = spec_from_dict(d)
    again = load_spec(write(tmp_path, spec.model_dump_yaml(), "dumped.yaml"))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert spec.to_dict()["sweep"] == {"temperature": [0.5, 1.0]}


def test_reference_documents_every_field():
    text = reference_markdown()

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            assert f"`{prefix}{name}`" in text
            assert info.description, f"{prefix}{name} has no description"
            sub = getattr(info.annotation, "model_fields", None)
            if sub is not None:
                walk(info.annotation, f"{prefix}{name}.")

    walk(JobSpec, "")


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_example_jobs_validate(job):
    spec = load_spec(REPO / "jobs" / job)
    assert spec.name


def test_demo_job_is_a_small_cpu_job():
    spec = load_spec(REPO / "jobs" / "demo.yaml")
    assert spec.models.target.path == "smollm2-135m-instruct" and spec.models.target.dtype == "auto"
    assert spec.models.draft.kind == "suffix" and spec.speculative.num_draft_tokens == "auto"
    assert spec.sampling.n == 4 and spec.sampling.max_new_tokens <= 64 and spec.sampling.temperature == 0.8
    assert spec.resources.actors == 1 and spec.resources.gpus_per_actor == 0 and spec.resources.cpus_per_actor == 2
    assert spec.output.path == "out/demo" and spec.output.if_exists == "overwrite"


def test_gpu_cluster_job_uses_a_model_draft_and_object_storage():
    spec = load_spec(REPO / "jobs" / "gpu_cluster.yaml")
    assert spec.models.draft.kind == "model"
    assert "8B" in spec.models.target.path and "1B" in (spec.models.draft.path or "")
    assert spec.output.path.startswith("s3://")
    assert spec.resources.gpus_per_actor >= 1


# ------------------------------------------------------------------------- cluster configs

CLUSTER = REPO / "cluster"


def _pins(text: str) -> dict[str, str]:
    """name==version pins found anywhere in a text (pip lines, YAML lists)."""
    import re

    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.+-]*)", text)}


def test_cluster_yaml_files_parse_and_the_launcher_config_fits_rays_schema():
    import json

    import jsonschema
    import ray

    for path in sorted(CLUSTER.glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path.name
    schema = json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()), schema)


def test_cluster_configs_pin_one_set_of_versions():
    texts = {p.name: p.read_text() for p in CLUSTER.iterdir() if p.is_file()}
    runtime_pins = _pins(texts["runtime_env.yaml"])
    assert {"torch", "transformers", "pyarrow", "pydantic"} <= set(runtime_pins)
    for name in ("Dockerfile", "aws-gpu.yaml"):
        pins = _pins(texts[name])
        assert pins and all(runtime_pins[k] == v for k, v in pins.items() if k in runtime_pins), name
    import re

    ray_versions = set(re.findall(r"rayproject/ray:([0-9.]+)-", "\n".join(texts.values())))
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load(texts[name])
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        ray_versions.add(spec["rayVersion"])
    assert len(ray_versions) == 1, ray_versions


def test_kuberay_manifests_give_each_gpu_worker_a_gpu_and_a_persistent_model_cache():
    job = load_spec(REPO / "jobs" / "gpu_cluster.yaml")
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((CLUSTER / name).read_text())
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        [group] = spec["workerGroupSpecs"]
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(int(job.resources.gpus_per_actor))
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "/models" in mounts and env["HF_HOME"].startswith("/models/")  # hub downloads persist
        assert "HF_TOKEN" in env
    rayjob = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert "jobs/gpu_cluster.yaml" in rayjob["spec"]["entrypoint"]
