"""Fuzzing what effvision reads (issue 26 §3): recipes and ``--set`` overrides, and the files of a
run directory and a model dir (recipe.yaml, summary.json, environment.json, model.json with its
mode record, config.json, the legacy quant.json, checkpoints and the logs a resume rewrites
(metrics.jsonl, summary.csv), safetensors and ONNX files),
corrupted by hypothesis: truncated, empty, missing, not UTF-8, random bytes, a JSON list or number
where an object belongs, values of the wrong type, missing and extra keys, formats and mode
versions from the future, huge and odd numbers (1e308, 2**70, -1, NaN), tensors of the wrong
names, shapes and dtypes, ONNX graphs with the wrong inputs and weights.

The property, for every command that reads the file: it succeeds (a corruption nothing reads, or
one a reader recovers from, like a damaged ``latest`` pointer) or it fails with exit code 2 and a
single ``effvision: error:`` line, never a traceback; the Python API (``ev.load``) raises an
EffVisionError and nothing else; and a failing command leaves the directory exactly as it was
(every file's name, size, mtime and bytes).

Budget: at most 60 s on one core, fixtures included (measured: 42 s, of which 4 s build the
fixtures). The examples per property are fixed and derandomized (``_settings``: 80 recipes, 60
override sets, 150 model dirs, 60 run dirs, 40 checkpoints, 30 ONNX files), the CLI runs
in-process (``conftest.cli``), and the run and model dirs are built once per module and copied
per example.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from safetensors.torch import load as safetensors_tensors
from safetensors.torch import save as safetensors_bytes

import effvision as ev
from conftest import REPO, cli, tiny_recipe
from effvision.errors import EffVisionError
from effvision.models.io import ModelSpec, create_model

ERROR_PREFIX = "effvision: error: "


def _settings(examples: int) -> settings:
    """Bounded and reproducible: the same examples on every run, none remembered between runs."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- corruptions ----------------------------------------------------------------------------

# Values a field may hold after a bad edit, or a bug in another writer; each drawn as a fresh copy,
# since a later edit may descend into a list drawn before.
HOSTILE = st.sampled_from([None, True, -1, 0, 1, 99, 2**70, -2**70, 1e308, -1e308, float("nan"), float("inf"),
                           "", "x", "\n", "\x00", [], {}, [1, 2], ["a"], {"a": 1}, {"mode": "prune"}]
                          ).map(copy.deepcopy)
EXTRA_KEYS = st.sampled_from(["extra", "format", "version", "modes", "position", ""])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def _edited(draw: st.DrawFn, obj: Any) -> Any:
    """``obj`` with one or two fields set to a hostile value, deleted, or joined by an extra one.
    A depth is drawn first, then a field at that depth, so a top-level field (``format``) or a
    mode entry's ``version`` is hit as often as the leaves of a large record."""
    data = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 2))):
        by_depth: dict[int, list[tuple[Any, ...]]] = {}
        for path in _paths(data):
            by_depth.setdefault(len(path), []).append(path)
        if not by_depth:
            break
        *parents, key = draw(st.sampled_from(by_depth[draw(st.sampled_from(sorted(by_depth)))]))
        parent = data
        for k in parents:
            parent = parent[k]
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if action == "set":
            parent[key] = draw(HOSTILE)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(EXTRA_KEYS)] = draw(HOSTILE)
        else:
            parent.append(draw(HOSTILE))
    return data


@st.composite
def _damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """The file's bytes truncated, emptied, replaced by random bytes, with one byte flipped, or
    with bytes that are not UTF-8 inserted."""
    kind = draw(st.sampled_from(["truncate", "truncate", "empty", "random", "flip", "not_utf8"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    i = draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        return raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
    return raw[:i] + b"\xff\xfe\x80" + raw[i:]


def _from_the_future(obj: Any) -> list[bytes]:
    """``obj`` with one of its ``format`` or ``version`` fields (the spec's, a mode entry's) at 99."""
    out = []
    for *parents, key in _paths(obj):
        if key in ("format", "version"):
            data = copy.deepcopy(obj)
            node = data
            for k in parents:
                node = node[k]
            node[key] = 99
            out.append(json.dumps(data).encode())
    return out


def json_file(raw: bytes) -> st.SearchStrategy[bytes]:
    obj = json.loads(raw)
    return st.one_of(_edited(obj).map(lambda d: json.dumps(d).encode()), _damaged(raw),
                     st.sampled_from([b"[]", b"null", b"3", b'"x"', b"NaN", json.dumps([obj]).encode(),
                                      *_from_the_future(obj)]))


def yaml_file(raw: bytes) -> st.SearchStrategy[bytes]:
    obj = yaml.safe_load(raw)
    return st.one_of(_edited(obj).map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()), _damaged(raw),
                     st.sampled_from([b"- 1\n", b"null\n", b"3\n", b"a: [\n", b"{a: 1", b"\t- x",
                                      b"!!python/object:os.system {}\n", b"a: *b\n"]))


def safetensors_file(raw: bytes) -> st.SearchStrategy[bytes]:
    """Damaged bytes, a damaged header, or a valid file holding the wrong tensors."""
    state = safetensors_tensors(raw)
    header_len = struct.unpack("<Q", raw[:8])[0]

    @st.composite
    def wrong_tensors(draw: st.DrawFn) -> bytes:
        s = dict(state)
        name = draw(st.sampled_from(sorted(s)))
        kind = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "scalar", "none"]))
        if kind == "drop":
            del s[name]
        elif kind == "extra":
            s["extra.weight"] = torch.zeros(2)
        elif kind == "shape":
            s[name] = torch.zeros([d + 1 for d in s[name].shape] or [2])
        elif kind == "dtype":
            s[name] = s[name].to(draw(st.sampled_from([torch.int64, torch.float16, torch.bool])))
        elif kind == "scalar":
            s[name] = torch.tensor(1.0)
        else:
            s = {}
        return safetensors_bytes(s)

    @st.composite
    def bad_header(draw: st.DrawFn) -> bytes:
        if draw(st.booleans()):  # the 8-byte header length: zero, short, long, absurd
            length = draw(st.sampled_from([0, header_len - 1, header_len + 1, header_len + 10**6, 2**63]))
            return struct.pack("<Q", length) + raw[8:]
        i = 8 + draw(st.integers(0, header_len - 1))
        return raw[:i] + draw(st.sampled_from([b'"', b"{", b"\xff", b"9", b"-"])) + raw[i + 1:]

    return st.one_of(_damaged(raw), wrong_tensors(), bad_header())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_file(raw: bytes) -> st.SearchStrategy[bytes]:
    """A checkpoint's state.pt: damaged, or valid torch data that is not the state a checkpoint holds."""
    state = torch.load(io.BytesIO(raw), weights_only=True)
    not_a_state = st.sampled_from([[1], None, 3, "x", torch.zeros(2)]).map(_torch_bytes)
    return st.one_of(_damaged(raw), _edited(state).map(_torch_bytes), not_a_state)


def pointer_file(raw: bytes) -> st.SearchStrategy[bytes]:
    """checkpoints/latest: the name of no checkpoint, a path out of the folder, bytes that are not text."""
    return st.one_of(_damaged(raw), st.sampled_from([b"step-99999999", b"/", b"..", b"../../recipe.yaml",
                                                     b"step-", b"\x00", raw + b"\n\n"]))


def jsonl_file(raw: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(_damaged(raw), st.sampled_from([b"[]\n", b"3\n", b"{}\n{\n", b'{"global_step": "x"}\n',
                                                     b'{"eval": true}\n']))


def csv_file(raw: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(_damaged(raw), st.sampled_from([b"epoch\n1\n", b"global_step\nx\n", b"global_step\n\n",
                                                     raw + b"1,2,3\n", raw + b'"\n']))


def _graph(inputs: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto],
           initializers: list[onnx.TensorProto] = ()) -> bytes:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], list(initializers)),
                              opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString()


def _image(dtype: int = TensorProto.FLOAT, shape: tuple[Any, ...] = ("batch", 3, 32, 32)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", dtype, list(shape))


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    n = int(torch.tensor(shape).prod())
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape), [0.01 * (i % 7) for i in range(n)])


def classifier_onnx() -> bytes:
    """What ``effvision export`` makes, in small: NCHW float images with a dynamic batch -> 10
    logits (a real export costs seconds; to a reader the bytes are alike)."""
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], strides=[4, 4]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "head_w"], ["y"])]
    return _graph([_image()], nodes, [_weight("conv_w", 4, 3, 4, 4), _weight("head_w", 4, 10)])


def _external_weight() -> bytes:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[32, 4], data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value="missing_weights.bin")
    return _graph([_image()], [helper.make_node("MatMul", ["x", "w"], ["y"])], [w])


WRONG_GRAPHS: dict[str, Callable[[], bytes]] = {
    "int64_input": lambda: _graph([_image(TensorProto.INT64)], [helper.make_node("Cast", ["x"], ["y"], to=1)]),
    "no_input": lambda: _graph([], [helper.make_node("Constant", [], ["y"], value_float=1.0)]),
    "rank1_input": lambda: _graph([_image(shape=("batch",))], [helper.make_node("Identity", ["x"], ["y"])]),
    "static_batch": lambda: _graph([_image(shape=(4, 3, 32, 32))], [helper.make_node("Identity", ["x"], ["y"])]),
    "dynamic_hw": lambda: _graph([_image(shape=("b", 3, "h", "w"))], [helper.make_node("Identity", ["x"], ["y"])]),
    "weight_shape": lambda: _graph([_image()], [helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight("w", 5, 7)]),
    "missing_external_weight": _external_weight,
}


def onnx_file(raw: bytes) -> st.SearchStrategy[bytes]:
    """Damaged bytes of a graph, or small valid graphs with the wrong inputs and weights."""
    return st.one_of(_damaged(raw), st.sampled_from(sorted(WRONG_GRAPHS)).map(lambda k: WRONG_GRAPHS[k]()))


_BY_SUFFIX = {".json": json_file, ".yaml": yaml_file, ".safetensors": safetensors_file, ".pt": state_file,
              ".jsonl": jsonl_file, ".csv": csv_file, "": pointer_file}


def _file_strategy(path: Path) -> st.SearchStrategy[bytes | None]:
    """Corruptions of the file at ``path`` by its kind, or (None) the file missing; not for a
    stage's summary.json, whose absence is no corruption but a stage to run again."""
    corrupted = _BY_SUFFIX[path.suffix](path.read_bytes())
    return corrupted if path.name == "summary.json" else st.one_of(corrupted, st.none())


# ---- what a command must leave behind ------------------------------------------------------

def _tree(directory: Path) -> dict[str, tuple[int, int, str] | None]:
    """Each file's (size, mtime, sha256) and each folder (None), by path."""
    out: dict[str, tuple[int, int, str] | None] = {}
    for p in sorted(directory.rglob("*")):
        stat = p.stat()
        digest = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(directory))] = None if digest is None else (stat.st_size, stat.st_mtime_ns, digest)
    return out


def _check(r: subprocess.CompletedProcess, before: dict, after: dict, may_write: bool = False) -> None:
    """Success, or exit code 2 with one ``effvision: error:`` line; a failure leaves the folder as
    it was (``may_write``: a success may write, e.g. a resumed stage that finishes)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), \
            f"exit code {r.returncode}, stderr:\n{r.stderr[-3000:]}"
    if r.returncode != 0 or not may_write:
        assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@contextlib.contextmanager
def _copy(src: Path, scratch: Path, rel: str, data: bytes | None) -> Iterator[Path]:
    """A copy of folder ``src`` whose file ``rel`` holds ``data`` (None: removed)."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        dst = Path(tmp) / src.name
        shutil.copytree(src, dst)
        if data is None:
            (dst / rel).unlink()
        else:
            (dst / rel).write_bytes(data)
        yield dst


# ---- fixtures: a tiny run and two model dirs, built once ------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def run(scratch: Path) -> tuple[Path, Path]:
    """(recipe, run dir): two steps of training on 64 digits (no export stage: it costs seconds)."""
    recipe = tiny_recipe(scratch / "tiny.yaml", train={"epochs": 1, "log_every": 1, "eval_every": 0},
                         data={"batch_size": 32, "limit_train": 64, "limit_eval": 32})
    out = scratch / "run"
    r = cli("run", str(recipe), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return recipe, out


@pytest.fixture(scope="module")
def interrupted(run: tuple[Path, Path], scratch: Path) -> Path:
    """The run with its train stage's summary gone: ``--resume`` reads the stage's checkpoint."""
    dst = scratch / "interrupted"
    shutil.copytree(run[1], dst)
    (dst / "01-train" / "summary.json").unlink()
    return dst


@pytest.fixture(scope="module")
def model_dirs(scratch: Path) -> dict[str, Path]:
    """A model dir with a record (pruned, then quantized) and one in the format before the record
    (model.json with ``pruned``, plus quant.json: tests/data/legacy_model_dirs)."""
    model = create_model(ModelSpec(name="vit_micro_patch4_32"))
    g = torch.Generator().manual_seed(0)
    ev.prune(model, {"mlp": 0.5}, example_inputs=torch.randn(1, 3, 32, 32, generator=g))
    ev.quantize(model, ev.QuantConfig(target="ort-cpu"), calib=[torch.randn(16, 3, 32, 32, generator=g)] * 2)
    legacy = scratch / "legacy"
    shutil.copytree(REPO / "tests" / "data" / "legacy_model_dirs" / "pruned_quantized", legacy)
    shapes = json.loads((legacy / "shapes.json").read_text())
    (legacy / "shapes.json").unlink()
    (legacy / "model.safetensors").write_bytes(safetensors_bytes({k: torch.rand(s, generator=g) + 0.1
                                                                  for k, s in shapes.items()}))
    return {"recorded": ev.save(model, scratch / "recorded"), "legacy": legacy}


@pytest.fixture(scope="module")
def foreign(scratch: Path) -> Path:
    """A folder that is not a run directory: ``effvision run --out`` refuses it once the recipe is
    read, so a fuzzed recipe that parses never starts training."""
    d = scratch / "not-a-run"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    return d


# ---- recipes and overrides ------------------------------------------------------------------

def test_recipe_files(run: tuple[Path, Path], foreign: Path, scratch: Path) -> None:
    raw = (run[1] / "recipe.yaml").read_bytes()  # the resolved recipe: every key a recipe has
    before = _tree(foreign)

    @_settings(80)
    @given(yaml_file(raw))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "recipe.yaml"
            path.write_bytes(data)
            r = cli("run", str(path), "--out", str(foreign))
            assert r.returncode == 2  # one that parses stops at the foreign --out
            _check(r, before, _tree(foreign))

    check()


SEGMENTS = st.one_of(st.sampled_from(["stages", "train", "eval", "0", "1", "-1", "9", "²", "model", "data", "kwargs",
                                      "augment", "scale", "name", "seed", "threads", "epochs", "optimizer", "lr", ""]),
                     st.text(max_size=3))
OVERRIDE_VALUES = st.one_of(st.sampled_from(["", "[", "{a: 1", "!!python/object:os.system", "1e308", "1.0e308",
                                             ".nan", "2e-3", "null", "[1, 2]", "'", "*x", "%YAML", "99", "-1",
                                             "1180591620717411303424", "{}", "[]"]),
                            st.text(max_size=6))


def test_set_overrides(run: tuple[Path, Path], foreign: Path) -> None:
    before = _tree(foreign)
    override = st.one_of(st.tuples(st.lists(SEGMENTS, min_size=1, max_size=4).map(".".join), OVERRIDE_VALUES)
                         .map("=".join), st.text(max_size=6))

    @_settings(60)
    @given(st.lists(override, min_size=1, max_size=3))
    def check(sets: list[str]) -> None:
        # --set=VALUE: argparse would take a value starting with "-" for an option
        r = cli("run", str(run[0]), "--out", str(foreign), *[f"--set={s}" for s in sets])
        assert r.returncode == 2
        _check(r, before, _tree(foreign))

    check()


# ---- model dirs: ev.load and the commands that read one --------------------------------------

MODEL_FILES = [("recorded", "model.json"), ("recorded", "model.safetensors"), ("recorded", "config.json"),
               ("legacy", "model.json"), ("legacy", "quant.json")]


def test_model_dir_files(model_dirs: dict[str, Path], scratch: Path) -> None:
    @st.composite
    def cases(draw: st.DrawFn) -> tuple[str, str, bytes | None, str]:
        which, name = draw(st.sampled_from(MODEL_FILES))
        return which, name, draw(_file_strategy(model_dirs[which] / name)), draw(st.sampled_from(["bench", "push"]))

    @_settings(150)
    @given(cases())
    def check(case: tuple[str, str, bytes | None, str]) -> None:
        which, name, data, command = case
        with _copy(model_dirs[which], scratch, name, data) as d:
            before = _tree(d)
            try:
                ev.load(d)
            except EffVisionError as e:  # any other exception fails the test with its traceback
                assert "\n" not in str(e)
            args = {"bench": ["bench", str(d), "--backend", "torch", "--warmup", "0", "--iters", "1",
                              "--batch-size", "1"],
                    "push": ["push", str(d), "--repo", "a/b", "--stage-only", str(d.parent / "hub")]}[command]
            _check(cli(*args), before, _tree(d))

    check()


# ---- run dirs: eval, bench and --resume ------------------------------------------------------

# (file of the finished run, a command that reads it); nothing reads environment.json or a
# summary's contents: the commands must not trip over them either
RUN_READS = [("recipe.yaml", "eval"), ("recipe.yaml", "resume"), ("environment.json", "eval"),
             ("environment.json", "resume"), ("01-train/summary.json", "eval"), ("01-train/summary.json", "resume"),
             ("01-train/model/model.json", "eval"), ("01-train/model/model.safetensors", "eval"),
             ("01-train/model/model.json", "bench"), ("01-train/model/config.json", "bench")]


def _command(kind: str, recipe: Path, run_dir: Path) -> list[str]:
    bench = ["--backend", "torch", "--warmup", "0", "--iters", "1", "--batch-size", "1"]
    return {"eval": ["eval", str(run_dir), "--device", "cpu"], "bench": ["bench", str(run_dir), *bench],
            "resume": ["run", str(recipe), "--out", str(run_dir), "--resume"]}[kind]


def test_run_dir_files(run: tuple[Path, Path], scratch: Path) -> None:
    recipe, run_dir = run

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[str, bytes | None, str]:
        rel, command = draw(st.sampled_from(RUN_READS))
        return rel, draw(_file_strategy(run_dir / rel)), command

    @_settings(60)
    @given(cases())
    def check(case: tuple[str, bytes | None, str]) -> None:
        rel, data, command = case
        with _copy(run_dir, scratch, rel, data) as d:
            before = _tree(d)
            _check(cli(*_command(command, recipe, d)), before, _tree(d))

    check()


# What --resume reads of an interrupted train stage: its checkpoint and its logs. A resume that
# succeeds (a damaged ``latest`` pointer is a lost one) finishes the stage, and so writes.
CHECKPOINT_READS = ["01-train/checkpoints/latest", "01-train/checkpoints/{step}/state.pt",
                    "01-train/checkpoints/{step}/weights.safetensors", "01-train/metrics.jsonl",
                    "01-train/summary.csv"]


def test_checkpoint_files(run: tuple[Path, Path], interrupted: Path, scratch: Path) -> None:
    step = next((interrupted / "01-train" / "checkpoints").glob("step-*")).name

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[str, bytes | None]:
        rel = draw(st.sampled_from(CHECKPOINT_READS)).format(step=step)
        return rel, draw(_file_strategy(interrupted / rel))

    @_settings(40)
    @given(cases())
    def check(case: tuple[str, bytes | None]) -> None:
        rel, data = case
        with _copy(interrupted, scratch, rel, data) as d:
            before = _tree(d)
            _check(cli(*_command("resume", run[0], d)), before, _tree(d), may_write=True)

    check()


# ---- ONNX files given to bench ---------------------------------------------------------------

def test_onnx_files(scratch: Path) -> None:
    @_settings(30)
    @given(onnx_file(classifier_onnx()))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(data)
            before = _tree(Path(tmp))
            r = cli("bench", str(path), "--backend", "ort", "--warmup", "0", "--iters", "1", "--batch-size", "1")
            _check(r, before, _tree(Path(tmp)))

    check()
