"""A deterministic stand-in engine for job-system tests (driver, CLI), no model inside.

``build(spec)`` is an engine factory (build.import_factory path ``tests.fake_engine:build``).
Each (request id, seed, sample index) gets a fixed pseudo-random completion, so outputs are
reproducible across shards, actors, retries and runs, like the real engine's.

Prompts are encoded word by word; two words are special:

* ``POISON`` makes ``generate`` raise (an application error, the actor survives);
* ``CRASH`` makes the actor process exit (an actor death).

Behaviour is steered by an optional ``fake_engine.json`` beside the input Parquet file:
``{"delay_s": seconds per request, "die_marker": path}``; when the ``die_marker`` file
exists during ``generate``, the engine deletes it and kills its own process, once (so a test
can kill an actor in the middle of generation after some shards were committed).

``"write_fault": {"errno": "ENOSPC", "after": k, "log": path}`` simulates an output store that
refuses writes: in the actor's process, every shard-file write after the first k raises
``OSError(errno)`` as the file system would (the write path of ``specbatch.jobs.data.files`` is
patched there; no disk is really full), and appends a line to ``log`` per refused write.

``build_real(spec)`` is the real engine with the same die_marker behaviour (and delay_s
slept before each shard's generation).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import time

import torch

from specbatch.engine.request import DraftCounts, Request, SampleOutput
from specbatch.engine.stats import AcceptanceStats
from specbatch.jobs.build import LoadedEngine

POISON_ID = 9001
CRASH_ID = 9002
GAMMA = 3


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def encode(prompt) -> list[int]:
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    ids = []
    for word in text.split():
        ids.append(POISON_ID if word == "POISON" else CRASH_ID if word == "CRASH" else _hash(word) % 1000)
    if not ids:
        raise ValueError("prompt has no words")
    return ids


class FakeEngine:
    """Implements specbatch.jobs.build.EngineLike: fixed gamma, no cost model, step shapes of one-row steps."""

    def __init__(self, control: dict):
        self.stats = AcceptanceStats()
        self.cost_model = None
        self.gamma = GAMMA
        self.gamma_reason = "the fake engine's fixed gamma"
        self.rows_by_proposals: collections.Counter[tuple[int, int]] = collections.Counter()
        self.steps_by_shape: collections.Counter[tuple[int, int]] = collections.Counter()
        self.delay_s = float(control.get("delay_s", 0.0))
        self.die_marker = control.get("die_marker")

    def _maybe_die(self) -> None:
        if self.die_marker and os.path.exists(self.die_marker):
            try:
                os.remove(self.die_marker)
            except FileNotFoundError:  # another actor took it
                return
            os._exit(1)

    def sample(self, request: Request, index: int) -> SampleOutput:
        params = request.params
        h = _hash(params.seed, params.temperature, request.request_id, index)
        length = 1 + h % params.max_new_tokens
        tokens = [(h >> (i % 48)) % 997 + i for i in range(length)]
        finish = "length" if length == params.max_new_tokens else "eos"
        steps = (length + GAMMA) // (GAMMA + 1)
        proposed = GAMMA * steps
        accepted = max(0, length - steps)
        tested = min(proposed, accepted + steps)
        return SampleOutput(
            request_id=request.request_id,
            sample_index=index,
            token_ids=tokens,
            text=" ".join(f"w{t}" for t in tokens),
            finish_reason=finish,
            stop_reason=None,
            cumulative_logprob=-0.25 * length,
            num_prompt_tokens=len(request.prompt_token_ids),
            counts=DraftCounts(proposed, tested, accepted, steps),
        )

    def generate(self, requests: list[Request]) -> list[SampleOutput]:
        outputs = []
        for request in requests:
            if POISON_ID in request.prompt_token_ids:
                raise RuntimeError(f"poisoned prompt {request.request_id}")
            if CRASH_ID in request.prompt_token_ids:
                os._exit(3)
            for index in request.indices():
                self._maybe_die()
                out = self.sample(request, index)
                self.stats.add_step(
                    torch.tensor([out.counts.draft_proposed]), torch.tensor([out.counts.draft_tested]),
                    torch.tensor([out.counts.draft_accepted]), torch.tensor([out.num_tokens]),
                )
                self.stats.steps += out.counts.target_passes - 1  # add_step counted one row-step
                self.rows_by_proposals[(1, GAMMA)] += out.counts.target_passes
                self.steps_by_shape[(1, GAMMA)] += out.counts.target_passes
                outputs.append(out)
            if self.delay_s:
                time.sleep(self.delay_s)
        return outputs


def _inject_write_fault(fault: dict) -> None:
    """Make this process's shard-file writes fail with fault["errno"] after fault["after"] of them."""
    import errno as errnos

    from specbatch.jobs.data import files

    code = getattr(errnos, fault["errno"])
    put, written = files._put, []

    def failing_put(fs, path, data):
        if ".part-" in path or path.rsplit("/", 1)[-1].startswith("part-"):
            if len(written) >= int(fault.get("after", 0)):
                with open(fault["log"], "a") as log:
                    log.write(f"{path}\n")
                raise OSError(code, f"[errno {code}] {os.strerror(code)}")
            written.append(path)
        put(fs, path, data)

    files._put = failing_put


def build(spec) -> LoadedEngine:
    control_path = pathlib.Path(spec.input.path).parent / "fake_engine.json"
    control = json.loads(control_path.read_text()) if control_path.is_file() else {}
    if control.get("fail_init"):
        raise RuntimeError("fake engine refused to start")
    if control.get("write_fault"):
        _inject_write_fault(control["write_fault"])
    return LoadedEngine(engine=FakeEngine(control), encode=encode, description={"device": "cpu", "engine": "fake"})


class _DyingEngine:
    """The real engine, killing its process (once) when the control's die_marker appears."""

    def __init__(self, engine, die_marker: str | None, delay_s: float = 0.0):
        self.engine = engine
        self.die_marker = die_marker
        self.delay_s = delay_s

    def __getattr__(self, name):  # the rest of EngineLike: stats, cost_model, gamma, step shapes
        return getattr(self.engine, name)

    def _maybe_die(self, _output=None) -> None:
        if self.die_marker and os.path.exists(self.die_marker):
            try:
                os.remove(self.die_marker)
            except FileNotFoundError:
                return
            os._exit(1)

    def generate(self, requests):
        time.sleep(self.delay_s)  # widens the window in which a test can kill mid-shard
        return self.engine.generate(requests, on_output=self._maybe_die)


def build_real(spec) -> LoadedEngine:
    """specbatch's real engine (build.build_engine), which dies on the control's die_marker
    between two finished samples: an actor killed in the middle of real generation."""
    from specbatch.jobs.build import build_engine

    control_path = pathlib.Path(spec.input.path).parent / "fake_engine.json"
    control = json.loads(control_path.read_text()) if control_path.is_file() else {}
    loaded = build_engine(spec)
    loaded.engine = _DyingEngine(loaded.engine, control.get("die_marker"), float(control.get("delay_s", 0.0)))
    return loaded
