"""The preflight: every check a job gets before Ray starts, in one place.

``run`` (through :func:`specbatch.jobs.driver.run_job`), ``validate``, ``demo`` and ``submit`` call
:func:`preflight` on a loaded spec (``spec.load_spec`` has already checked the YAML, the schema
and the value limits of ``specbatch.sampling.limits``). The stages, in order:

1. *input*: the files exist, are Parquet, have the columns, have rows, unique non-null ids and
   one kind of prompt (``data.check_input``), and ids of one type across the files;
2. *output location*: the directory can be created and written (probed with a temporary
   directory that is removed again), is not a file, not under a file, not an input file;
   on an object store its bucket and location are looked up (``get_file_info``), nothing more
   (for ``validate``, a store that does not answer from here is a warning); then
   ``output.if_exists`` against what the directory holds (``data.check_existing_output``: a
   non-empty directory under ``fail``, another spec's output under ``resume``, or a plan made
   from input files that have changed since: every refusal of a resume is made here, so a
   refused resume writes nothing);
3. *models* (specbatch's own engine only; a custom engine factory loads what it likes): each
   checkpoint directory has config.json (parsed), safetensors weights, tokenizer files; a name
   is a checkpoint directory, a registered name or a hub id, and a string that looks like a path
   is never taken for a hub id; then the sampling values that depend on the target (token ids
   within its vocabulary, max_new_tokens within its context).

Before the stages, for specbatch's own engine, every module a job imports is imported here
(``deps.check``: a missing or broken dependency is ``DependencyError``, one line).

Every failure raises ``SpecError`` or ``InputError`` (exit code 2) with one line naming the field
or file and what was expected; nothing is written. Checks that need a live cluster (a local
output path on a multi-node cluster) stay in the driver (``driver.check_cluster_output``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.jobs import data, storage
from specbatch import deps
from specbatch.jobs.data import InputError, InputInfo
from specbatch.jobs.spec import JobSpec, SpecError
from specbatch.jobs.build import ENGINE_FACTORY


@dataclass(frozen=True)
class Checked:
    """What the preflight found: the input's layout (None when not checked here) and the
    target's config (None when its checkpoint is not on this machine: a hub id, a registered
    model not pulled yet, a path on the cluster's nodes), and what was left unchecked."""

    input: InputInfo | None
    target: Any | None  # specbatch.models.ModelConfig
    warnings: tuple[str, ...] = ()  # one line each, e.g. an output store not reachable from here


def preflight(spec: JobSpec, *, engine_factory: str = ENGINE_FACTORY, here: bool = True, offline: bool = False) -> Checked:
    """Check input, output location and models; raise SpecError / InputError (one line).

    here=False (``submit``): the job runs on a cluster whose disks this machine may not see;
    input and output are left to the job's own preflight there, and model directories are
    checked only where they exist here. offline=True (``validate``): an output object store
    that cannot be reached from here is a warning (:attr:`Checked.warnings`), not an error.
    """
    if engine_factory == ENGINE_FACTORY and here:
        deps.check()  # a broken environment is one line here, not a traceback from an actor
    info = check_input(spec) if here else None
    warning = check_output_location(spec, info, offline=offline) if here else None
    target = None
    if engine_factory == ENGINE_FACTORY:
        elsewhere = not here or bool(os.environ.get("RAY_ADDRESS"))  # paths may exist on the nodes only
        target = check_models(spec, elsewhere=elsewhere)
    return Checked(input=info, target=target, warnings=(warning,) if warning else ())


# ---------------------------------------------------------------------------------------------
# Input


def check_input(spec: JobSpec) -> InputInfo:
    """data.check_input, then one id type across the files."""
    info = data.check_input(spec.input, spec.output)
    if len(info.files) > 1 and info.id_column is not None:
        _check_id_types(spec, info)
    return info


def _type_family(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    return str(t)


def _holds(want: pa.DataType, got: pa.DataType) -> bool:
    """An integer type `want` holds every value of the integer type `got` (shards cast to the first file's type)."""
    if pa.types.is_signed_integer(want) == pa.types.is_signed_integer(got):
        return want.bit_width >= got.bit_width
    return pa.types.is_signed_integer(want) and want.bit_width > got.bit_width


def _check_id_types(spec: JobSpec, info: InputInfo) -> None:
    """Ids: all strings, or all integers the first file's type holds (a shard is read in the first
    file's types). Prompts need no such check: data.check_input refuses text in one file and chat
    messages in another, and the variants of each cast to one another."""
    fs, files = data.list_input_files(spec.input.path)
    uri, column = spec.input.path, info.id_column
    shown = [uri.split("://", 1)[0] + "://" + f if "://" in uri else f for f in files]
    types = []
    for path in files:
        with fs.open_input_file(path) as f:
            types.append(pq.read_schema(f).field(column).type)
    want = types[0]
    for name, got in zip(shown[1:], types[1:]):
        if _type_family(want) != _type_family(got) or _type_family(want) == "integer" and not _holds(want, got):
            raise InputError(
                f"{name}: id column {column!r} has type {got}, but {shown[0]} has {want}; ids must have one "
                "type across the input files (all strings, or integers the first file's type holds)"
            )


# ---------------------------------------------------------------------------------------------
# Output location


def check_output_location(spec: JobSpec, info: InputInfo | None, offline: bool = False) -> str | None:
    """The output directory can be made and written here; it is neither a file nor an input file;
    ``output.if_exists`` lets this spec write it as it is.

    offline (``validate``): an object store that does not answer from this machine (network,
    DNS, credentials; common for a cluster job checked on a laptop) is not an error: the warning
    line is returned instead, and the bucket and ``output.if_exists`` stay unchecked. A store
    that answers that the bucket does not exist or that access is denied is an error either way.
    """
    uri = spec.output.path
    try:
        fs, path = data.resolve(uri)
    except InputError as e:
        return _unreachable(f"output.path: {e}", str(e), offline)
    if not isinstance(fs, pafs.LocalFileSystem):
        return _check_object_store(spec, fs, path, offline, info)
    if info is not None and (storage.is_local(info.uri) or info.uri.startswith("file://")):
        out = os.path.realpath(path)
        for f in map(os.path.realpath, info.files):
            if f == out:
                raise InputError(f"output.path: {uri} is an input file; write the output to a directory elsewhere")
            if f.startswith(out.rstrip(os.sep) + os.sep):
                raise InputError(f"output.path: {uri} holds the input file {f}; write the output to a directory elsewhere")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = uri if existing == path else f"{uri}: {existing}"
        raise InputError(f"output.path: {what} is a file, expected a directory")
    verb = "write in it" if existing == path else f"create it in {existing}"
    try:
        probe = tempfile.mkdtemp(prefix=".specbatch-probe-", dir=existing)
    except OSError as e:
        raise InputError(f"output.path: {uri}: cannot {verb} ({e.strerror or e})") from None
    shutil.rmtree(probe, ignore_errors=True)
    data.check_existing_output(spec.input, spec.output, spec.fingerprint(), info)
    return None


# Words of an object store's client that mean no answer came (network, DNS, TLS, credentials),
# as opposed to an answer such as "no such bucket" or "access denied".
_NO_ANSWER = (
    "network_connection", "curlcode", "resolve host", "resolve hostname", "could not connect", "failed to connect",
    "connection refused", "timed out", "timeout", "ssl", "credentials", "invalid_access_key_id",
    "invalidaccesskeyid", "signature_does_not_match", "expired_token", "missing_authentication_token",
)


def _unreachable(line: str, why: str, offline: bool) -> str:
    """The warning line when offline and the store gave no answer; else raise InputError(line)."""
    if offline and any(word in why.lower() for word in _NO_ANSWER):
        return f"{line}; the output location is not checked from here"
    raise InputError(line)


def _check_object_store(spec: JobSpec, fs: pafs.FileSystem, path: str, offline: bool,
                        info: InputInfo | None = None) -> str | None:
    """The bucket exists and answers, the location is not a file, if_exists allows the spec."""
    uri = spec.output.path
    bucket = path.split("/", 1)[0]
    try:
        bucket_kind = fs.get_file_info(bucket).type if data._is_object_store(fs) else None
        kind = fs.get_file_info(path).type
    except (OSError, pa.ArrowException) as e:
        why = " ".join(str(e).split())[:300]
        return _unreachable(f"output.path: {uri}: cannot reach it ({why})", why, offline)
    if bucket_kind == pafs.FileType.NotFound:
        raise InputError(f"output.path: {uri}: the bucket {bucket} does not exist")
    if kind == pafs.FileType.File:
        raise InputError(f"output.path: {uri} is a file, expected a directory")
    data.check_existing_output(spec.input, spec.output, spec.fingerprint(), info)
    return None


# ---------------------------------------------------------------------------------------------
# Models


def check_models(spec: JobSpec, elsewhere: bool = False) -> Any | None:
    """Check the target and the draft checkpoints; return the target's ModelConfig (or None).

    elsewhere: a path that is not here may exist on the cluster's nodes, so it is not an error.
    """
    target = _check_model("models.target.path", spec.models.target.path, elsewhere, spec.models.target.backend)
    if spec.models.draft.kind == "model":
        _check_model("models.draft.path", spec.models.draft.path, elsewhere, spec.models.draft.backend)
    from specbatch.models.config import SUPPORTED_ARCHITECTURES

    native = spec.models.target.backend != "transformers" and getattr(target, "architecture", None) in SUPPORTED_ARCHITECTURES
    if target is not None and spec.models.target.compile and not native:
        raise SpecError(f"models.target.compile: only the native backend compiles; {target.architecture} runs on transformers")
    if target is not None and spec.models.target.cuda_graphs and not native:
        raise SpecError(f"models.target.cuda_graphs: only the native backend runs CUDA graphs; "
                        f"{target.architecture} runs on transformers")
    if target is not None:
        _check_against_target(spec, target)
    return target


def _check_model(field: str, text: str, elsewhere: bool, backend: str = "auto") -> Any | None:
    from specbatch.models.registry import REGISTRY, cache_root, is_hub_id

    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return _check_checkpoint(field, text, path, backend)
    if text in REGISTRY:
        pulled = cache_root() / "models" / text
        return _check_checkpoint(field, text, pulled, backend) if pulled.is_dir() else None  # else the actors pull it
    if path.exists():
        raise SpecError(f"{field}: {text}: expected a checkpoint directory, found a file")
    if elsewhere:
        return None
    if is_hub_id(text):
        return None  # downloaded by the actors
    raise SpecError(
        f"{field}: no such directory {text} (expected a checkpoint directory, a registered name "
        f"({', '.join(sorted(REGISTRY))}) or a hub id owner/name)"
    )


def _check_checkpoint(field: str, text: str, directory: pathlib.Path, backend: str = "auto") -> Any:
    """config.json that parses (for the backend that will run it), safetensors weights (all shards
    of an index), tokenizer files."""
    from specbatch.models.backends import choose_backend
    from specbatch.models.checkpoint import INDEX_FILE, SINGLE_FILE, weight_files
    from specbatch.models.config import parse_config
    from specbatch.models.errors import CheckpointError
    from specbatch.models.loader import TOKENIZER_FILES

    if not (directory / "config.json").is_file():
        raise SpecError(f"{field}: {text}: not a checkpoint directory (no config.json)")
    try:
        if choose_backend(directory, backend) == "transformers":
            from specbatch.models.hf_backend import transformers_config

            config = transformers_config(directory)
        else:
            config = parse_config(directory)
        if not (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).is_file():
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f"; found {', '.join(pickled)}, which is never unpickled" if pickled else ""
            raise SpecError(f"{field}: {text}: needs safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){found}")
        missing = sorted({p.name for p in weight_files(directory).values() if not p.is_file()})
        if missing:
            raise SpecError(f"{field}: {text}: {INDEX_FILE} lists {missing[0]}, which is missing")
    except CheckpointError as e:
        raise SpecError(f"{field}: {' '.join(str(e).split())}") from None
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise SpecError(f"{field}: {text}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return config


def _sampling_values(spec: JobSpec, key: str) -> Iterator[tuple[str, Any]]:
    """(field path, value) of a sampling key: its sweep values when swept, else sampling.<key>."""
    if spec.sweep and key in spec.sweep:
        for i, value in enumerate(spec.sweep[key]):
            yield f"sweep.{key}[{i}]", value
    else:
        yield f"sampling.{key}", getattr(spec.sampling, key)


def _check_against_target(spec: JobSpec, config: Any) -> None:
    """Values that depend on the target: the context length and the vocabulary."""
    limit = config.max_position_embeddings
    max_model_len = spec.models.target.max_model_len
    if max_model_len is not None and max_model_len > limit:
        raise SpecError(f"models.target.max_model_len: must be <= the target's max_position_embeddings ({limit}), got {max_model_len}")
    context, source = (max_model_len, "models.target.max_model_len") if max_model_len else (limit, "max_position_embeddings")
    for where, value in _sampling_values(spec, "max_new_tokens"):
        if value > context:
            raise SpecError(f"{where}: must be <= the target's context of {context} tokens ({source}), got {value}")
    vocab = config.vocab_size
    for token in spec.sampling.logit_bias:
        if token >= vocab:
            raise SpecError(f"sampling.logit_bias: token id {token} is outside the target's vocabulary (ids 0..{vocab - 1})")
    for token in spec.sampling.stop_token_ids:
        if token >= vocab:
            raise SpecError(f"sampling.stop_token_ids: token id {token} is outside the target's vocabulary (ids 0..{vocab - 1})")
