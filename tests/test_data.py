"""The data layer: input checks, stable shard plans, row reading, atomic shard writes, manifests,
if_exists, the output schema, and URIs through pyarrow.fs. No models, no Ray."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from specbatch.jobs import data
from specbatch.jobs.data import (
    InputError,
    OutputRecord,
    RowGroup,
    Shard,
    ShardManifest,
    check_input,
    committed,
    output_schema,
    pending_shards,
    plan_rows,
    plan_shards,
    prepare_output,
    read_output,
    read_rows,
    split_shard,
    write_manifest,
    write_shard,
)
from specbatch.jobs.spec import InputSpec, OutputSpec, apply_override, spec_from_dict

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_parquet(path: pathlib.Path, n: int = 10, row_group_size: int | None = None, start: int = 0, **columns) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"id": [f"p{start + i}" for i in range(n)], "prompt": [f"prompt number {start + i}" for i in range(n)]}
    cols.update(columns)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def make_spec(inp, out, *overrides: str, **input_fields):
    d = {
        "name": "t",
        "input": {"path": str(inp), **input_fields},
        "output": {"path": str(out)},
        "models": {"target": {"path": "tiny"}},
    }
    for o in overrides:
        d = apply_override(d, o)
    return spec_from_dict(d)


def record(row: dict, sample_index: int = 0, **changes) -> OutputRecord:
    """An output record of `row`; `changes` set fixed columns, or extra ones (kept input columns, sweep keys)."""
    fixed = {"id": row["id"], "sample_index": sample_index, "prompt": row["prompt"], "finish_reason": "length",
             "completion": f"done {row['id']}", "completion_token_ids": [1, 2, 3], "num_prompt_tokens": 4,
             "num_tokens": 3, "stop_reason": None, "cumulative_logprob": -1.5, "draft_proposed": 4,
             "draft_tested": 3, "draft_accepted": 2, "target_passes": 2, "error": None}
    extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "error")}  # passed-through columns
    if "error" in row:
        fixed.update(finish_reason="error", error=row["error"], completion=None, completion_token_ids=None)
    for key, value in changes.items():
        (fixed if key in fixed else extra)[key] = value
    return OutputRecord(**fixed, extra=extra)


def prepare(spec) -> list[str]:
    """prepare_output as a run of `spec` calls it."""
    return prepare_output(spec.input, spec.output, spec.fingerprint(), spec.to_dict())


def plan_of(spec) -> list[Shard]:
    """plan_shards as a run of `spec` calls it."""
    return plan_shards(spec.input, spec.output, spec.resources.shard_rows)


def schema_of(spec) -> pa.Schema:
    """The output schema of `spec`'s shards."""
    return output_schema(spec.input, spec.fingerprint(), spec.sweep)


def commit(spec, shard, n: int = 1) -> ShardManifest:
    rows = read_rows(spec.input, shard)
    records = [record(r, s) for r in rows for s in range(n)]
    written = write_shard(spec.output, shard, records, schema_of(spec))
    return write_manifest(spec.output, ShardManifest.of_records(shard, len(rows), records, written), spec.fingerprint())


# ------------------------------------------------------------------------------------ planning


def test_plan_rows_packs_small_row_groups_and_cuts_large_ones():
    groups = [RowGroup(0, 0, 0, 3), RowGroup(0, 1, 3, 3), RowGroup(0, 2, 6, 3), RowGroup(1, 0, 9, 0),
              RowGroup(1, 1, 9, 14), RowGroup(1, 2, 23, 1)]
    shards = plan_rows(groups, shard_rows=6)
    assert [(s.start, s.stop) for s in shards] == [(0, 6), (6, 9), (9, 14), (14, 19), (19, 23), (23, 24)]
    assert [s.name for s in shards] == [f"part-{i:05d}" for i in range(6)]


def test_plan_is_stable_for_the_same_input(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=50, row_group_size=7)
    a = plan_of(make_spec(inp, tmp_path / "a", "resources.shard_rows=16"))
    b = plan_of(make_spec(inp, tmp_path / "b", "resources.shard_rows=16"))
    assert a == b
    assert a[0].start == 0 and a[-1].stop == 50
    assert all(x.stop == y.start for x, y in zip(a, a[1:]))
    assert all(s.num_rows <= 16 for s in a)
    assert all(s.start % 7 == 0 for s in a)  # row groups are not cut when they fit


def test_replan_reuses_plan_json(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=40, row_group_size=5)
    first = plan_of(make_spec(inp, tmp_path / "out", "resources.shard_rows=10"))
    assert (tmp_path / "out" / data.PLAN_FILE).exists()
    again = plan_of(make_spec(inp, tmp_path / "out", "resources.shard_rows=25"))
    assert again == first and len(first) == 4


def test_replan_refuses_a_changed_input(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=40)
    plan_of(make_spec(inp, tmp_path / "out"))
    make_parquet(inp, n=41)
    with pytest.raises(InputError, match=r"__specbatch__/plan\.json: planned for an input of 40 rows"):
        plan_of(make_spec(inp, tmp_path / "out"))


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_shard_check_on_an_input_caught_half_rewritten_says_it_changed(tmp_path, how):
    """An actor that reads the input while it is being rewritten in place (a few bytes written,
    or the file gone for a moment) refuses the shard as a changed input, not as a bad file."""
    inp = make_parquet(tmp_path / "in.parquet", n=40, row_group_size=5)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=10")
    shards = plan_of(spec)
    plan = data.read_plan(spec.output)
    data.check_shard_input(spec.input, shards[0], plan)  # unchanged: nothing to say
    if how == "truncated":
        pathlib.Path(inp).write_bytes(b"PAR1")
    else:
        os.remove(inp)
    with pytest.raises(InputError, match=rf"^input\.path: {inp} changed since .*plan\.json was planned \(it no longer reads: "):
        data.check_shard_input(spec.input, shards[1], plan)


def test_split_and_pending_shards_cover_uncommitted_rows_once(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=20)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=10")
    prepare(spec)
    plan = plan_of(spec)
    assert pending_shards(plan, committed(spec.output)) == plan
    left, right = split_shard(plan[0])
    assert (left.name, left.start, left.stop) == ("part-00000.1", 0, 5)
    assert (right.name, right.start, right.stop) == ("part-00000.2", 5, 10)
    commit(spec, left)
    commit(spec, plan[1])
    assert pending_shards(plan, committed(spec.output)) == [right]
    rl, rr = split_shard(right)
    commit(spec, rr)
    assert pending_shards(plan, committed(spec.output)) == [rl]
    commit(spec, rl)
    assert pending_shards(plan, committed(spec.output)) == []
    out = read_output(str(tmp_path / "out"))
    assert out.column("id").to_pylist() == [f"p{i}" for i in range(20)]
    with pytest.raises(ValueError, match="cannot be split"):
        split_shard(Shard("part-00009", 3, 4))


def test_pending_shards_recurse_into_split_halves_and_retry_failed_ones():
    planned = [Shard("part-00000", 0, 8), Shard("part-00001", 8, 10)]
    committed = {
        "part-00000.1": ShardManifest("part-00000.1", 0, 4),
        "part-00000.2.1": ShardManifest("part-00000.2.1", 4, 6),
        "part-00000.2.2.2": ShardManifest("part-00000.2.2.2", 7, 8, failed=True),
    }
    names = [s.name for s in pending_shards(planned, committed)]
    assert names == ["part-00000.2.2.1", "part-00000.2.2.2", "part-00001"]
    got = {s.name: (s.start, s.stop) for s in pending_shards(planned, committed)}
    assert got["part-00000.2.2.1"] == (6, 7)


# -------------------------------------------------------------------------------------- inputs


def test_directory_input_reads_files_in_sorted_order_and_skips_hidden(tmp_path):
    make_parquet(tmp_path / "d" / "b.parquet", n=3, start=3)
    make_parquet(tmp_path / "d" / "a.parquet", n=3, start=0)
    make_parquet(tmp_path / "d" / "sub" / "c.parquet", n=2, start=6)
    make_parquet(tmp_path / "d" / "_tmp" / "x.parquet", n=2, start=100)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".hidden.parquet").write_text("junk")
    (tmp_path / "d" / "README.txt").write_text("not data")
    spec = make_spec(tmp_path / "d", tmp_path / "out", "resources.shard_rows=100")
    info = check_input(spec.input, spec.output)
    assert [os.path.relpath(f, tmp_path / "d") for f in info.files] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert info.num_rows == 8
    rows = read_rows(spec.input, Shard("part-00000", 0, 8))
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(8)]


def test_glob_input_stays_within_one_directory_level(tmp_path):
    make_parquet(tmp_path / "d" / "x1.parquet", n=2, start=0)
    make_parquet(tmp_path / "d" / "x2.parquet", n=2, start=2)
    make_parquet(tmp_path / "d" / "y.parquet", n=2, start=50)
    make_parquet(tmp_path / "d" / "sub" / "x3.parquet", n=2, start=90)
    info = check_input(InputSpec(path=str(tmp_path / "d" / "x*.parquet")), OutputSpec(path=str(tmp_path / "out")))
    assert [os.path.basename(f) for f in info.files] == ["x1.parquet", "x2.parquet"]
    deep = check_input(InputSpec(path=str(tmp_path / "d" / "**" / "x*.parquet")), OutputSpec(path=str(tmp_path / "out")))
    # '**' spans directory levels (zero or more); files stay in sorted path order ("sub/" < "x1").
    assert [os.path.relpath(f, tmp_path / "d") for f in deep.files] == ["sub/x3.parquet", "x1.parquet", "x2.parquet"]


def test_read_rows_across_row_groups_and_files(tmp_path):
    make_parquet(tmp_path / "d" / "a.parquet", n=13, row_group_size=4, start=0)
    make_parquet(tmp_path / "d" / "b.parquet", n=9, row_group_size=5, start=13)
    spec = make_spec(tmp_path / "d", tmp_path / "out")
    info = check_input(spec.input, spec.output)
    assert [g.num_rows for g in info.row_groups] == [4, 4, 4, 1, 5, 4]
    for start, stop in [(0, 22), (3, 9), (11, 15), (12, 13), (21, 22), (5, 5)]:
        rows = read_rows(spec.input, Shard("s", start, stop))
        assert [r["id"] for r in rows] == [f"p{i}" for i in range(start, stop)]
        assert [r["prompt"] for r in rows] == [f"prompt number {i}" for i in range(start, stop)]
    with pytest.raises(InputError, match="outside"):
        read_rows(spec.input, Shard("s", 20, 23))


def test_keep_columns_pass_through_with_their_types(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=4, topic=["a", "b", None, "d"], score=[1.5, 2.5, 3.5, 4.5],
                       tags=[["x"], [], ["y", "z"], None])
    spec = make_spec(inp, tmp_path / "out", keep_columns=["topic", "score", "tags"])
    prepare(spec)
    rows = read_rows(spec.input, Shard("part-00000", 0, 4))
    assert [(r["topic"], r["score"], r["tags"]) for r in rows] == [("a", 1.5, ["x"]), ("b", 2.5, []), (None, 3.5, ["y", "z"]), ("d", 4.5, None)]
    schema = schema_of(spec)
    assert schema.field("score").type == pa.float64() and schema.field("tags").type == pa.list_(pa.string())
    write_shard(spec.output, Shard("part-00000", 0, 4), [record(r) for r in rows], schema_of(spec))
    back = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert back.column("tags").to_pylist() == [["x"], [], ["y", "z"], None]
    assert back.schema.names[-3:] == ["topic", "score", "tags"]


def test_chat_message_prompts(tmp_path):
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Hi"}],
        [],
        [{"role": None, "content": "x"}],
        None,
    ]
    inp = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e"], "messages": chats}), inp)
    spec = make_spec(inp, tmp_path / "out", prompt_column="messages")
    info = check_input(spec.input, spec.output)
    assert info.prompt_kind == "chat"
    rows = read_rows(spec.input, Shard("part-00000", 0, 5))
    assert rows[0] == {"id": "a", "prompt": chats[0]}
    assert rows[1] == {"id": "b", "prompt": chats[1]}
    assert rows[2]["error"] == "row 2 (id 'c'): prompt has no chat messages"
    assert rows[3]["error"] == "row 3 (id 'd'): chat message 0 has no role"
    assert rows[4]["error"] == "row 4 (id 'e'): prompt is null"
    assert schema_of(spec).field("prompt").type == data.CHAT_TYPE
    prepare(spec)
    write_shard(spec.output, Shard("part-00000", 0, 5), [record(r) for r in rows], schema_of(spec))
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("prompt").to_pylist()[:2] == chats[:2]


def test_invalid_rows_carry_an_error_and_neighbours_are_fine(tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": ["ok", None, "   ", "also ok"]}), inp)
    rows = read_rows(InputSpec(path=str(inp)), Shard("part-00000", 0, 4))
    assert rows[0] == {"id": "a", "prompt": "ok"} and rows[3] == {"id": "d", "prompt": "also ok"}
    assert rows[1] == {"id": "b", "prompt": None, "error": "row 1 (id 'b'): prompt is null"}
    assert rows[2]["error"] == "row 2 (id 'c'): prompt is empty"


def test_ids_absent_are_stable_row_indices(tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(7)]}), inp, row_group_size=3)
    spec = make_spec(inp, tmp_path / "out")
    assert check_input(spec.input, spec.output).id_column is None
    assert [r["id"] for r in read_rows(spec.input, Shard("s", 2, 6))] == ["2", "3", "4", "5"]
    # id_column null ignores an existing id column
    with_ids = make_parquet(tmp_path / "ids.parquet", n=3)
    spec = make_spec(with_ids, tmp_path / "out2", id_column=None)
    assert [r["id"] for r in read_rows(spec.input, Shard("s", 0, 3))] == ["0", "1", "2"]


def test_integer_ids_become_strings(tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"key": [10, 20, 30], "prompt": ["a", "b", "c"]}), inp)
    spec = make_spec(inp, tmp_path / "out", id_column="key")
    assert [r["id"] for r in read_rows(spec.input, Shard("s", 0, 3))] == ["10", "20", "30"]


# ----------------------------------------------------------------------------- malformed input

MALFORMED_INPUTS = [
    # (name, builder(tmp) -> (input path, input fields), expected message start with {tmp} placeholder)
    "missing_file", "empty_directory", "glob_matches_nothing", "not_parquet", "missing_prompt_column",
    "missing_id_column", "missing_keep_column", "duplicate_ids", "duplicate_ids_across_files", "null_id",
    "empty_dataset", "wrong_prompt_type", "float_ids", "mixed_prompt_kinds", "keep_column_type_differs",
]


def build_malformed(name: str, tmp: pathlib.Path):
    d = tmp / "in"
    d.mkdir()
    if name == "missing_file":
        return d / "nope.parquet", {}, f"input.path: no such file or directory: {d}/nope.parquet"
    if name == "empty_directory":
        (d / "notes.txt").write_text("x")
        return d, {}, f"input.path: no Parquet files (*.parquet) in directory {d}"
    if name == "glob_matches_nothing":
        make_parquet(d / "a.parquet")
        return d / "*.json", {}, f"input.path: no files match {d}/*.json"
    if name == "not_parquet":
        (d / "a.parquet").write_text("id,prompt\n1,hello\n")
        return d / "a.parquet", {}, f"{d}/a.parquet: not a Parquet file"
    if name == "missing_prompt_column":
        make_parquet(d / "a.parquet")
        return d / "a.parquet", {"prompt_column": "promt"}, f"{d}/a.parquet: input.prompt_column 'promt' not found (did you mean 'prompt'?)"
    if name == "missing_id_column":
        make_parquet(d / "a.parquet")
        return d / "a.parquet", {"id_column": "key"}, f"{d}/a.parquet: input.id_column 'key' not found (columns: id, prompt)"
    if name == "missing_keep_column":
        make_parquet(d / "a.parquet", topic=["t"] * 10)
        return d / "a.parquet", {"keep_columns": ["topics"]}, f"{d}/a.parquet: input.keep_columns entry 'topics' not found (did you mean 'topic'?)"
    if name == "duplicate_ids":
        pq.write_table(pa.table({"id": ["a", "b", "c", "b"], "prompt": ["1", "2", "3", "4"]}), d / "a.parquet")
        return d / "a.parquet", {}, f"{d}/a.parquet: duplicate id 'b' in column 'id' (rows 1 and 3)"
    if name == "duplicate_ids_across_files":
        make_parquet(d / "a.parquet", n=3)
        make_parquet(d / "b.parquet", n=3, start=2)
        return d, {}, f"{d}/b.parquet: duplicate id 'p2' in column 'id' (rows 2 and 3)"
    if name == "null_id":
        pq.write_table(pa.table({"id": ["a", None], "prompt": ["1", "2"]}), d / "a.parquet")
        return d / "a.parquet", {}, f"{d}/a.parquet: id column 'id' is null at row 1"
    if name == "empty_dataset":
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), d / "a.parquet")
        return d / "a.parquet", {}, f"input.path: {d}/a.parquet has no rows"
    if name == "wrong_prompt_type":
        pq.write_table(pa.table({"id": ["a"], "prompt": [42]}), d / "a.parquet")
        return d / "a.parquet", {}, f"{d}/a.parquet: column 'prompt' has type int64, expected string or list<struct<role: string, content: string>>"
    if name == "float_ids":
        pq.write_table(pa.table({"id": [1.0, 2.0], "prompt": ["a", "b"]}), d / "a.parquet")
        return d / "a.parquet", {}, f"{d}/a.parquet: id column 'id' has type double, expected string or integer"
    if name == "mixed_prompt_kinds":
        make_parquet(d / "a.parquet", n=2)
        pq.write_table(pa.table({"id": ["z"], "prompt": [[{"role": "user", "content": "hi"}]]}), d / "b.parquet")
        return d, {}, f"{d}/b.parquet: column 'prompt' holds chat prompts, earlier files hold text"
    if name == "keep_column_type_differs":
        make_parquet(d / "a.parquet", n=2, topic=["x", "y"])
        make_parquet(d / "b.parquet", n=2, start=2, topic=[1, 2])
        return d, {"keep_columns": ["topic"]}, f"{d}/b.parquet: column 'topic' has type int64, earlier files have string"
    raise AssertionError(name)


def test_output_inside_the_input_directory_is_refused(tmp_path):
    make_parquet(tmp_path / "d" / "a.parquet")
    for inp, out in ((tmp_path / "d", "d/out"), (f"{tmp_path}/d/**/*.parquet", "d/out"), (f"{tmp_path}/d/*.parquet", "d"),
                     (f"{tmp_path}/d/*/*.parquet", "d/out")):
        with pytest.raises(InputError, match=r"^output.path: .* is inside the input directory"):
            check_input(InputSpec(path=str(inp)), OutputSpec(path=str(tmp_path / out)))
    # A glob reads only the files it matches: an output no match can lie in is not inside it,
    # whatever prefix it shares with the glob's directory (issue 20).
    for inp, out in ((f"{tmp_path}/d/*.parquet", "d/out"), (f"{tmp_path}/d/a*.parquet", "d/a_out"),
                     (f"{tmp_path}/d/a*.parquet", "d/a_out/sub")):
        check_input(InputSpec(path=str(inp)), OutputSpec(path=str(tmp_path / out)))
    out = OutputSpec(path=str(tmp_path / "d" / "out"))
    check_input(InputSpec(path=str(tmp_path / "d" / "a.parquet")), out)  # a single file is fine
    check_input(InputSpec(path=str(tmp_path / "d")), OutputSpec(path=str(tmp_path / "d2")))  # a sibling whose name extends it is fine


@pytest.mark.parametrize("name", MALFORMED_INPUTS)
def test_malformed_input_fails_with_one_line_naming_the_file_and_writes_nothing(tmp_path, name):
    inp, fields, expected = build_malformed(name, tmp_path)
    spec = make_spec(inp, tmp_path / "out", **fields)
    with pytest.raises(InputError) as info:
        check_input(spec.input, spec.output)
    assert str(info.value) == expected
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ output writing


def test_write_is_atomic_no_partial_file_under_the_final_name(tmp_path, monkeypatch):
    inp = make_parquet(tmp_path / "in.parquet", n=4)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    shard = Shard("part-00000", 0, 4)
    rows = read_rows(spec.input, shard)
    final = tmp_path / "out" / "part-00000.parquet"
    real_put = data.files._put
    seen = []

    def crashing_put(fs, where, payload):
        seen.append(where)
        assert not final.exists(), "the final name must not exist while the shard is written"
        assert os.path.basename(where).startswith(".part-00000.parquet.tmp-")
        real_put(fs, where, payload[:100])  # a partial file ...
        raise OSError("disk full")  # ... then the writer dies

    monkeypatch.setattr(data.files, "_put", crashing_put)
    with pytest.raises(OSError, match="disk full"):
        write_shard(spec.output, shard, [record(r) for r in rows], schema_of(spec))
    assert seen and not final.exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if "part-" in p.name] == []  # temp file cleaned up
    monkeypatch.setattr(data.files, "_put", real_put)
    written = write_shard(spec.output, shard, [record(r) for r in rows], schema_of(spec))
    assert written.path == str(tmp_path / "out") + "/part-00000.parquet"
    assert written.size == final.stat().st_size and written.sha256 == hashlib.sha256(final.read_bytes()).hexdigest()
    assert pq.read_table(final).num_rows == 4
    # A retry rewrites the same name whole.
    write_shard(spec.output, shard, [record(r, completion="second") for r in rows], schema_of(spec))
    assert set(pq.read_table(final).column("completion").to_pylist()) == {"second"}


def test_object_store_path_writes_the_fixed_key_directly(tmp_path, monkeypatch):
    inp = make_parquet(tmp_path / "in.parquet", n=3)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    shard = Shard("part-00000", 0, 3)
    targets = []
    real_put = data.files._put

    def spy(fs, where, payload):
        targets.append(where)
        real_put(fs, where, payload)

    monkeypatch.setattr(data.files, "_is_object_store", lambda fs: True)
    monkeypatch.setattr(data.files, "_put", spy)
    write_shard(spec.output, shard, [record(r) for r in read_rows(spec.input, shard)], schema_of(spec))
    assert targets == [str(tmp_path / "out" / "part-00000.parquet")]


def test_manifest_commits_only_a_complete_file(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=3")
    prepare(spec)
    s0, s1 = plan_of(spec)
    with pytest.raises(data.OutputIOError, match="part-00000.parquet: the shard file is missing"):
        write_manifest(spec.output, ShardManifest("part-00000", 0, 3, rows=3), spec.fingerprint())
    commit(spec, s0, n=2)
    # s1's file is written but not committed (a crash between file and manifest): invisible.
    write_shard(spec.output, s1, [record(r) for r in read_rows(spec.input, s1)], schema_of(spec))
    manifests = committed(spec.output)
    assert list(manifests) == ["part-00000"]
    m = manifests["part-00000"]
    assert (m.shard, m.start, m.stop, m.file, m.rows, m.samples) == ("part-00000", 0, 3, "part-00000.parquet", 3, 6)
    assert m.fingerprint == spec.fingerprint() and m.tokens == 18 and m.finish_reasons == {"length": 6}
    out = read_output(str(tmp_path / "out"))
    assert out.num_rows == 6
    assert list(zip(out.column("id").to_pylist(), out.column("sample_index").to_pylist())) == [
        (f"p{i}", s) for i in range(3) for s in range(2)
    ]
    assert json.loads((tmp_path / "out" / data.manifest_name("part-00000")).read_text())["rows"] == 3


def test_read_output_refuses_overlapping_shards(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    commit(spec, Shard("part-00000", 0, 6))
    commit(spec, Shard("part-00000.2", 3, 6))
    with pytest.raises(ValueError, match="overlap"):
        read_output(str(tmp_path / "out"))


def test_write_shard_rejects_malformed_records(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=2)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    shard = Shard("part-00000", 0, 2)
    row = read_rows(spec.input, shard)[0]
    with pytest.raises(ValueError, match="unknown column"):
        write_shard(spec.output, shard, [record(row, colour="red")], schema_of(spec))
    with pytest.raises(ValueError, match="finish_reason"):
        write_shard(spec.output, shard, [record(row, finish_reason="done")], schema_of(spec))
    assert not (tmp_path / "out" / "part-00000.parquet").exists()


def test_all_null_error_column_reads_back_with_the_declared_schema(tmp_path):
    pd = pytest.importorskip("pandas")
    inp = make_parquet(tmp_path / "in.parquet", n=3, topic=["a", "b", "c"])
    spec = make_spec(inp, tmp_path / "out", "sweep.temperature=[0.5, 1.0]", keep_columns=["topic"])
    prepare(spec)
    shard = Shard("part-00000", 0, 3)
    rows = read_rows(spec.input, shard)
    records = [record(r, s, topic=r["topic"], temperature=t) for r in rows for t in (0.5, 1.0) for s in range(2)]
    written = write_shard(spec.output, shard, records, schema_of(spec))
    write_manifest(spec.output, ShardManifest.of_records(shard, 3, records, written), spec.fingerprint())
    declared = schema_of(spec)
    on_disk = pq.read_schema(tmp_path / "out" / "part-00000.parquet")
    assert on_disk.equals(declared, check_metadata=False)
    assert on_disk.field("error").type == pa.string() and on_disk.field("temperature").type == pa.float64()
    table = read_output(str(tmp_path / "out"))
    assert table.column("error").null_count == len(records)
    df = table.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 12
    assert list(df.columns) == declared.names
    assert df["error"].isna().all() and df["sample_index"].dtype == "int64"
    assert sorted(df["temperature"].unique()) == [0.5, 1.0]
    assert df["completion_token_ids"].iloc[0].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------------- if_exists


def test_resume_keeps_committed_shards_and_clears_leftovers(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=3")
    prepare(spec)
    s0, s1 = plan_of(spec)
    commit(spec, s0)
    (tmp_path / "out" / data.SUCCESS_FILE).write_text("")
    (tmp_path / "out" / ".part-00001.parquet.tmp-abc").write_text("partial")
    (tmp_path / "out" / data.MANIFEST_DIR / ".part-00001.json.tmp-abc").write_text("partial")
    write_shard(spec.output, s1, [record(r) for r in read_rows(spec.input, s1)], schema_of(spec))  # written, never committed
    # Different resources: same outputs, so resuming is allowed.
    again = make_spec(inp, tmp_path / "out", "resources.shard_rows=5", "resources.actors=3")
    prepare(again)
    assert list(committed(again.output)) == ["part-00000"]
    assert [s.name for s in pending_shards(plan_of(again), committed(again.output))] == ["part-00001"]
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == [data.MANIFEST_DIR + "/part-00000.json", data.PLAN_FILE, data.SPEC_FILE, "part-00000.parquet"]


def test_resume_uncommits_shards_whose_file_or_manifest_was_damaged(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=10)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=2")
    prepare(spec)
    plan = plan_of(spec)
    for shard in plan:
        commit(spec, shard, n=2)
    out = tmp_path / "out"
    (out / "part-00000.parquet").unlink()  # missing
    with open(out / "part-00001.parquet", "r+b") as f:
        f.truncate(200)  # short
    changed = bytearray((out / "part-00002.parquet").read_bytes())
    changed[len(changed) // 2] ^= 0xFF
    (out / "part-00002.parquet").write_bytes(bytes(changed))  # same size, other bytes
    manifest = out / data.manifest_name("part-00003")
    manifest.write_bytes(manifest.read_bytes()[:50])  # a manifest that does not read
    with pytest.raises(ValueError, match=r"part-00003: its manifest does not read"):
        read_output(str(out))
    notes = prepare(spec)
    assert [n.split(":")[0] for n in notes] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert "missing" in notes[0] and "has 200 bytes" in notes[1] and "sha256" in notes[2] and "does not read" in notes[3]
    assert list(committed(spec.output)) == ["part-00004"]
    assert pending_shards(plan, committed(spec.output)) == plan[:4]
    assert [p.name for p in out.glob("part-*")] == ["part-00004.parquet"]
    assert [p.name for p in (out / data.MANIFEST_DIR).iterdir()] == ["part-00004.json"]
    assert read_output(str(out)).column("id").to_pylist() == ["p8", "p8", "p9", "p9"]


def test_a_first_version_manifest_is_verified_by_reading_its_file(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=4)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=2")
    prepare(spec)
    for shard in plan_of(spec):
        commit(spec, shard, n=3)
    for path in (tmp_path / "out" / data.MANIFEST_DIR).glob("*.json"):  # as the first version wrote them
        m = json.loads(path.read_text())
        for key in ("version", "file_bytes", "file_sha256"):
            del m[key]
        path.write_text(json.dumps(m))
    assert committed(spec.output)["part-00000"].file_sha256 is None
    with open(tmp_path / "out" / "part-00001.parquet", "r+b") as f:
        f.truncate(200)
    notes = prepare(spec)
    assert len(notes) == 1 and notes[0].startswith("part-00001: part-00001.parquet does not read as Parquet")
    assert list(committed(spec.output)) == ["part-00000"]
    newer = tmp_path / "out" / data.manifest_name("part-00000")
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "version": 99}))
    with pytest.raises(InputError, match=r"part-00000.json: manifest version 99 was written by a newer specbatch"):
        prepare(spec)
    assert newer.exists()  # refused, never uncommitted


def test_an_output_of_the_first_layout_reads_and_resumes_into_the_current_one(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=2")
    prepare(spec)
    plan = plan_of(spec)
    for shard in plan[:2]:
        commit(spec, shard)
    out = tmp_path / "out"
    # As the first layout wrote it: manifests, plan, spec, stats and _SUCCESS beside the shards.
    for m in (out / data.MANIFEST_DIR).iterdir():
        m.rename(out / (m.stem + ".manifest.json"))
    (out / data.MANIFEST_DIR).rmdir()
    (out / data.PLAN_FILE).rename(out / "_plan.json")
    (out / data.SPEC_FILE).rename(out / "_spec.json")
    (out / data.META_DIR).rmdir()
    (out / "stats.json").write_text("{}")
    (out / "_SUCCESS").write_text("")
    assert list(committed(spec.output)) == ["part-00000", "part-00001"]
    assert read_output(str(out)).column("id").to_pylist() == ["p0", "p1", "p2", "p3"]
    assert prepare(spec) == []
    assert sorted(p.name for p in out.iterdir()) == [data.META_DIR, "part-00000.parquet", "part-00001.parquet"]
    assert list(committed(spec.output)) == ["part-00000", "part-00001"]
    assert plan_of(spec) == plan and pending_shards(plan, committed(spec.output)) == plan[2:]


def test_remove_uncommitted_leaves_exactly_the_committed_shards(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=8)
    spec = make_spec(inp, tmp_path / "out", "resources.shard_rows=4")
    prepare(spec)
    s0, s1 = plan_of(spec)
    commit(spec, s0)
    # s1 was written by an attempt whose actor died before the commit, then split and redone.
    write_shard(spec.output, s1, [record(r) for r in read_rows(spec.input, s1)], schema_of(spec))
    for half in split_shard(s1):
        commit(spec, half)
    (tmp_path / "out" / ".part-00009.parquet.tmp-0123").write_text("partial")
    assert data.remove_uncommitted(spec.output) == [".part-00009.parquet.tmp-0123", "part-00001.parquet"]
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.1.parquet", "part-00001.2.parquet"]
    assert read_output(str(tmp_path / "out")).column("id").to_pylist() == [f"p{i}" for i in range(8)]


def test_resume_refuses_a_directory_written_by_a_different_spec(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    commit(spec, Shard("part-00000", 0, 6))
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    other = make_spec(inp, tmp_path / "out", "sampling.temperature=0.3")
    with pytest.raises(InputError) as info:
        prepare(other)
    assert str(info.value).startswith(f"output.path: {tmp_path / 'out'} was written by a different spec")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_overwrite_clears_the_directory(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=6)
    spec = make_spec(inp, tmp_path / "out")
    prepare(spec)
    plan_of(spec)
    commit(spec, Shard("part-00000", 0, 6))
    other = make_spec(inp, tmp_path / "out", "sampling.temperature=0.3", "output.if_exists=overwrite")
    prepare(other)
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        data.META_DIR, data.MANIFEST_DIR, data.SPEC_FILE]
    assert json.loads((tmp_path / "out" / data.SPEC_FILE).read_text())["fingerprint"] == other.fingerprint()
    assert committed(other.output) == {}


def test_fail_refuses_a_non_empty_directory_and_accepts_an_empty_one(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=2)
    (tmp_path / "empty").mkdir()
    prepare(make_spec(inp, tmp_path / "empty", "output.if_exists=fail"))
    spec = make_spec(inp, tmp_path / "out", "output.if_exists=fail")
    prepare(spec)
    with pytest.raises(InputError, match=r"is not empty \(if_exists: fail\)$"):
        prepare(spec)


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_a_foreign_directory_is_never_cleared_or_resumed(tmp_path, mode):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    spec = make_spec(make_parquet(tmp_path / "in.parquet", n=2), tmp_path / "home", f"output.if_exists={mode}")
    with pytest.raises(InputError, match="not a specbatch output"):
        prepare(spec)
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["thesis.tex"]


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    spec = make_spec(make_parquet(tmp_path / "in.parquet", n=2), tmp_path / "out")
    with pytest.raises(InputError, match="is a file, expected a directory"):
        prepare(spec)


# --------------------------------------------------------------------------------------- URIs


def test_file_uris_go_through_pyarrow_fs(tmp_path):
    make_parquet(tmp_path / "d" / "a.parquet", n=5, start=0)
    make_parquet(tmp_path / "d" / "b.parquet", n=5, start=5)
    spec = make_spec(f"file://{tmp_path}/d/*.parquet", f"file://{tmp_path}/out", "resources.shard_rows=4")
    info = check_input(spec.input, spec.output)
    assert info.num_rows == 10
    prepare(spec)
    plan = plan_of(spec)
    for shard in plan:
        commit(spec, shard)
    assert committed(spec.output).keys() == {s.name for s in plan}
    table = read_output(f"file://{tmp_path}/out")
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(10)]
    assert read_output(str(tmp_path / "out")).equals(table)
    assert data.output_uri(spec.output, "stats.json") == f"file://{tmp_path}/out/stats.json"
    data.write_json(data.output_uri(spec.output, "stats.json"), {"rows": 10})
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == {"rows": 10}


def test_errors_name_files_the_way_the_input_was_given(tmp_path):
    make_parquet(tmp_path / "d" / "a.parquet", n=2)
    spec = make_spec(f"file://{tmp_path}/d", tmp_path / "out", prompt_column="text")
    with pytest.raises(InputError) as info:
        check_input(spec.input, spec.output)
    assert str(info.value).startswith(f"file://{tmp_path}/d/a.parquet: input.prompt_column 'text' not found")


def test_resolve_and_locality():
    fs, path = data.resolve("file:///tmp/x/y")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x/y"
    fs, path = data.resolve("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("relative/dir")
    assert data.is_local("out/demo") and data.is_local("/abs/out")
    assert not data.is_local("file:///mnt/shared/out")  # a URI is a deliberate (possibly shared) mount
    assert not data.is_local("s3://bucket/out") and not data.is_local("gs://bucket/out")
    with pytest.raises(InputError, match="nosuchscheme://x: cannot open filesystem"):
        data.resolve("nosuchscheme://x")


def test_subtree_filesystem_is_not_an_object_store(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert not data._is_object_store(sub)


def test_layout_cache_sees_a_rewritten_input(tmp_path):
    inp = make_parquet(tmp_path / "in.parquet", n=3)
    spec = make_spec(inp, tmp_path / "out")
    assert read_rows(spec.input, Shard("s", 0, 3))[0]["prompt"] == "prompt number 0"
    pq.write_table(pa.table({"id": ["p0", "p1", "p2", "p3"], "prompt": ["new", "b", "c", "d"]}), inp)
    assert read_rows(spec.input, Shard("s", 0, 4))[0]["prompt"] == "new"


def test_repository_prompt_data_checks_out():
    for job in ("demo.yaml", "brainstorm.yaml", "temperature_sweep.yaml"):
        from specbatch.jobs.spec import load_spec

        spec = load_spec(REPO / "jobs" / job)
        spec = spec_from_dict(apply_override(spec.to_dict(), f"input.path={REPO / spec.input.path}"))
        info = check_input(spec.input, spec.output)
        assert info.num_rows >= 24, job
        rows = read_rows(spec.input, Shard("all", 0, info.num_rows))
        assert not any("error" in r for r in rows), job


def test_committed_prompt_data_matches_its_generator():
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("make_prompts", REPO / "jobs" / "data" / "make_prompts.py")
    make_prompts = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(make_prompts)
    assert pq.read_table(REPO / "jobs" / "data" / "demo_prompts.parquet").equals(make_prompts.demo_table())
    assert pq.read_table(REPO / "jobs" / "data" / "brainstorm_chat.parquet").equals(make_prompts.chat_table())
    prompts = make_prompts.demo_table().column("prompt").to_pylist()
    assert len(set(prompts)) == len(prompts) >= 24
