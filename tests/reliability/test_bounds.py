"""Bounded resources for every input (issue 29, class 4; docs/RELIABILITY.md "Inventory: bounded
resources"): every number a command or the library takes has a range checked before any work, and
every file read has a size bound and, where a regular file is expected, refuses anything else.

Numbers: hypothesis draws values out of each option's range (above, below, huge, negative, zero,
NaN, infinities, floats for ints, words) and checks the command stops at parsing, naming the option,
the value and the range, while the first step of its work (a spy) never runs; values in range reach
the spy. Files: sparse files (``truncate``: no disk used) one byte over the limit, FIFOs (in a
subprocess with a timeout: a FIFO that blocked would hang the suite), directories, /dev/zero and
symlinks to it.
"""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import BundleError, GenerationConfig, RMTRuntime, RuntimeInputError, limits
from rmt_runtime.limits import Bound, LimitError

BIN = Path(sys.executable).parent
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")


# ---- every command, its first step of work (the spy), and its bounded options ----------------------
class Spied(Exception):
    """Raised by a spy: the command got past its checks into its work."""


def _commands():
    from rmt_export import bench, cli as export_cli
    from rmt_runtime import build_cli, cli as run_cli, generate_cli
    return {"rmt-run": run_cli.main, "rmt-generate": generate_cli.main, "rmt-build": build_cli.main,
            "rmt-export": export_cli.main, "rmt-check-trt": export_cli.check_trt_main,
            "rmt-triton": export_cli.triton_main, "rmt-bench": bench.main}


def _spy(monkeypatch, called: list):
    """Replace the first step of every command's work by a recorder that stops the command there."""
    import rmt_export.bench
    import rmt_export.cli
    import rmt_export.triton
    import rmt_export.trt_gate
    import rmt_runtime.build_cli
    import rmt_runtime.cli
    import rmt_runtime.generate_cli

    def stop(*args, **kwargs):
        called.append(args)
        raise BundleError("spied")

    def export_stop(as_json):
        called.append(as_json)
        raise click.ClickException("spied")

    monkeypatch.setattr(rmt_runtime.cli.Bundle, "load", stop)  # rmt-run and rmt-generate read the bundle first
    monkeypatch.setattr(rmt_runtime.cli.RMTRuntime, "load", stop)
    monkeypatch.setattr(rmt_runtime.build_cli, "build_bundle_engines", stop)
    monkeypatch.setattr(rmt_export.cli, "require_export_stack", export_stop)
    monkeypatch.setattr(rmt_export.trt_gate, "check_bundle", stop)
    monkeypatch.setattr(rmt_export.triton, "write_triton_repository", stop)
    monkeypatch.setattr(rmt_export.bench, "run_bench", stop)
    assert rmt_runtime.generate_cli.Bundle is rmt_runtime.cli.Bundle


# (command, option, bound): every numeric option of every command.
OPTIONS = [
    ("rmt-run", "--threads", limits.THREADS), ("rmt-run", "--top-k", limits.TOP_K_SHOWN),
    ("rmt-generate", "--max-new-tokens", limits.MAX_NEW_TOKENS), ("rmt-generate", "--temperature", limits.TEMPERATURE),
    ("rmt-generate", "--top-k", limits.TOP_K), ("rmt-generate", "--top-p", limits.TOP_P),
    ("rmt-generate", "--repetition-penalty", limits.REPETITION_PENALTY),
    ("rmt-generate", "--stop-token", limits.TOKEN_ID), ("rmt-generate", "--seed", limits.SEED),
    ("rmt-generate", "--threads", limits.THREADS),
    ("rmt-build", "--workspace", limits.WORKSPACE_MB), ("rmt-build", "--max-batch", limits.MAX_BATCH),
    ("rmt-export", "--opset", limits.OPSET), ("rmt-export", "--segments", limits.VALIDATION_SEGMENTS),
    ("rmt-export", "--max-batch", limits.MAX_BATCH), ("rmt-export", "--workspace", limits.WORKSPACE_MB),
    ("rmt-export", "--num-mem-tokens", limits.NUM_MEM_TOKENS), ("rmt-export", "--segment-size", limits.SEGMENT_SIZE),
    ("rmt-export", "--lora-alpha", limits.LORA_ALPHA),
    ("rmt-check-trt", "--max-batch", limits.MAX_BATCH), ("rmt-check-trt", "--workspace", limits.WORKSPACE_MB),
    ("rmt-triton", "--max-batch", limits.MAX_BATCH), ("rmt-triton", "--max-sequences", limits.MAX_SEQUENCES),
    ("rmt-triton", "--idle-seconds", limits.IDLE_SECONDS), ("rmt-triton", "--queue-delay-us", limits.QUEUE_DELAY_US),
    ("rmt-triton", "--instances", limits.INSTANCES), ("rmt-triton", "--threads", limits.THREADS),
    ("rmt-bench", "--segments", limits.BENCH_SEGMENTS), ("rmt-bench", "--repeats", limits.REPEATS),
    ("rmt-bench", "--threads", limits.THREADS),
]
# Numeric options parsed by hand (a list in one string), each tested below.
PARSED_BY_HAND = {("rmt-bench", "--batches")}


def test_every_numeric_option_of_every_command_is_a_declared_bound():
    """A new option typed int/float/IntRange (no upper bound, or one declared apart) fails here."""
    seen, loose = set(), []
    for name, command in _commands().items():
        for param in command.params:
            if isinstance(param.type, limits.BoundType):
                seen.add((name, param.opts[0]))
            elif isinstance(param.type, (click.types._NumberParamTypeBase, click.types.BoolParamType)) \
                    and not getattr(param, "is_flag", False):
                loose.append(f"{name} {param.opts[0]} ({param.type.name})")
    assert loose == []
    assert seen == {(name, option) for name, option, _ in OPTIONS}
    for name, option, bound in OPTIONS:
        param = next(p for p in _commands()[name].params if p.opts[0] == option)
        assert param.type.bound is bound, (name, option)


@pytest.fixture
def places(tmp_path):
    """An existing directory and file for the options that need one (the spy stops before they are read)."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("1 2 3")
    return tmp_path


def _base_args(command: str, places: Path) -> list[str]:
    directory, file = str(places / "dir"), str(places / "file")
    return {"rmt-run": ["--bundle", directory, "--ids", file],
            "rmt-generate": ["--bundle", directory, "--prompt-ids", file],
            "rmt-build": ["--bundle", directory], "rmt-export": ["--ckpt", file],
            "rmt-check-trt": ["--bundle", directory],
            "rmt-triton": ["--bundle", directory, "--repo", str(places / "repo"), "--kind", "python"],
            "rmt-bench": ["--bundle", directory]}[command]


def _number_text(bound: Bound, value) -> str:
    return str(int(value)) if bound.integer and float(value).is_integer() and abs(value) < 1e300 else repr(value)


def out_of_range(bound: Bound):
    """Texts a user could type that are not in ``bound``: beyond either end, huge, NaN, inf, words."""
    high = int(bound.high) if bound.integer else bound.high
    beyond = [st.integers(min_value=int(high) + 1).map(str), st.just(str(10 ** 30)), st.just("-1"), st.just("0"),
              st.integers(max_value=int(bound.low) - 1).map(str) if bound.integer else
              st.floats(max_value=bound.low, allow_nan=False).map(repr),
              st.floats(min_value=bound.high, exclude_min=True, allow_infinity=False).map(repr) if not bound.integer
              else st.integers(min_value=1, max_value=10 ** 6).map(lambda k: f"{bound.high + k}.0"),
              st.sampled_from(["nan", "inf", "-inf", "1e400", "true", "", "ten", "0x10", "1.5", "2.0e3"])]
    return st.one_of(*beyond).filter(lambda text: not _accepted_by(bound, text))


def _accepted_by(bound: Bound, text: str) -> bool:
    try:
        value = int(text, 10) if bound.integer else float(text)
    except ValueError:
        return False
    return bound.allows(value)


def in_range(bound: Bound):
    if bound.integer:
        return st.integers(min_value=int(bound.low), max_value=int(bound.high)).map(str)
    return st.floats(min_value=bound.low, max_value=bound.high, exclude_min=bound.low_open).map(repr)


@pytest.mark.parametrize("command, option, bound", OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
@SETTINGS
@given(data=st.data())
def test_an_option_out_of_its_range_stops_the_command_before_any_work(places, command, option, bound, data):
    text = data.draw(out_of_range(bound), label="value")
    called = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _spy(monkeypatch, called)
        result = CliRunner().invoke(_commands()[command], [*_base_args(command, places), option, text])
    assert result.exit_code == 2, (result.output, result.exception)
    assert called == []
    assert option in result.output
    try:
        float(text)
    except ValueError:
        assert "is not an integer" in result.output or "is not a number" in result.output
    else:
        if bound.integer and not _accepted_by(limits.Bound("x", -float("inf"), float("inf"), ""), text):
            assert "is not an integer" in result.output  # 1.5, nan: not an int at all
        else:
            parsed = int(text, 10) if bound.integer else float(text)
            assert bound.describe() in result.output and f"got {limits.shown(parsed)[:40]}" in result.output
    assert not (places / "repo").exists()


@pytest.mark.parametrize("command, option, bound", OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_option_in_its_range_reaches_the_work(places, command, option, bound, data):
    """The control of the test above: the same command with a value in range gets to the spy."""
    text = data.draw(in_range(bound), label="value")
    called = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _spy(monkeypatch, called)
        result = CliRunner().invoke(_commands()[command], [*_base_args(command, places), option, text])
    assert "spied" in result.output, result.output
    assert called


@pytest.mark.parametrize("batches, message", [
    ("1,100000", "a batch size must be an int in 1..4096"), ("0", "a batch size must be an int in 1..4096"),
    (",".join(["1"] * 17), "at most 16 comma-separated batch sizes, got 17"), ("1,x", "comma-separated positive"),
    ("9" * 5000, "comma-separated positive"),  # int() refuses 5000 digits: not a huge allocation
])
def test_bench_batches_are_bounded_each_and_in_number(places, batches, message):
    called = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _spy(monkeypatch, called)
        result = CliRunner().invoke(_commands()["rmt-bench"], [*_base_args("rmt-bench", places), "--batches", batches])
    assert result.exit_code == 2 and message in result.output and called == []


# ---- the library: the same bounds, before any work --------------------------------------------------
def bad_numbers(bound: Bound):
    """Python values out of ``bound``: beyond its ends, bools, NaN, infinities, floats for ints, strings."""
    values = [st.integers(min_value=int(bound.high) + 1), st.just(10 ** 400), st.just(-10 ** 5000), st.booleans(),
              st.just(float("nan")), st.just(float("inf")), st.just("1")]
    values.append(st.integers(max_value=int(bound.low) - (0 if bound.low_open else 1)) if bound.integer or
                  bound.low_open else st.floats(max_value=bound.low, exclude_max=True, allow_nan=False))
    if bound.integer:
        values.append(st.floats(min_value=bound.low, max_value=bound.high).filter(lambda x: not x.is_integer()))
    else:
        values.append(st.floats(min_value=bound.high, exclude_min=True))
    return st.one_of(*values).filter(lambda value: not bound.allows(value))


@SETTINGS
@given(threads=bad_numbers(limits.THREADS))
def test_load_refuses_threads_out_of_range_before_reading_the_bundle(tmp_path, threads):
    with pytest.raises(LimitError, match=r"threads must be an int in 1\.\.1024 .*got"):
        RMTRuntime.load(tmp_path / "no bundle here", threads=threads)


def test_load_with_threads_in_range_goes_on_to_the_bundle(tmp_path):
    with pytest.raises(BundleError):
        RMTRuntime.load(tmp_path / "no bundle here", threads=4)


@pytest.fixture(scope="module")
def rt(bundle_factory):
    return RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path, backend="onnxruntime")


@SETTINGS
@given(batch=st.one_of(st.integers(min_value=limits.BATCH.high + 1), st.just(10 ** 400)))
def test_a_batch_beyond_its_bound_is_refused_before_allocating(rt, batch):
    with pytest.raises(LimitError, match=r"batch must be an int in 1\.\.65536"):
        rt.new_state(batch)


def test_a_batch_larger_than_the_machines_memory_is_refused_before_allocating(rt, monkeypatch):
    per_row = sum(4 * int(np.prod(shape)) for shape in rt.state_shapes.values())
    monkeypatch.setattr(limits, "physical_memory", lambda: 3 * per_row)
    allocated = []
    monkeypatch.setattr(np, "repeat", lambda *a, **k: allocated.append(a))
    with pytest.raises(LimitError, match=r"a state of batch 4 needs [\d.]+ GiB, more than this machine's"):
        rt.new_state(4)
    assert allocated == []
    monkeypatch.undo()
    assert rt.new_state(3).batch == 3


GENERATION_BOUNDS = [limits.MAX_NEW_TOKENS, limits.TOP_K, limits.TEMPERATURE, limits.REPETITION_PENALTY,
                     limits.SEED]


@pytest.mark.parametrize("bound", GENERATION_BOUNDS, ids=lambda b: b.name)
@SETTINGS
@given(data=st.data())
def test_generation_settings_above_their_bound_are_refused_when_made(bound, data):
    value = data.draw(st.one_of(st.integers(min_value=int(bound.high) + 1), st.just(10 ** 5000)) if bound.integer
                      else st.one_of(st.floats(min_value=bound.high, exclude_min=True, allow_infinity=False),
                                     st.integers(min_value=int(bound.high) + 1)))
    with pytest.raises(RuntimeInputError, match=rf"{bound.name} must be at most {bound.high}"):
        GenerationConfig(**{bound.name: value})


@SETTINGS
@given(text=st.text(max_size=3), value=st.one_of(st.integers(), st.floats()))
def test_the_click_type_and_the_library_agree(text, value):
    """One mechanism: for any value, the option accepts it exactly when ``Bound.check`` does."""
    for bound in (limits.THREADS, limits.TEMPERATURE, limits.TOP_P):
        kind = limits.option_type(bound)
        for given_value in (value, text, repr(value)):
            try:
                parsed = kind.convert(given_value, None, None)
            except click.BadParameter:
                parsed = None
            try:
                expected = bound.check(int(given_value, 10) if bound.integer and isinstance(given_value, str)
                                       else float(given_value) if isinstance(given_value, str) else given_value)
            except (LimitError, ValueError):
                expected = None
            assert parsed == expected or (parsed != parsed and expected != expected), (bound.name, given_value)


def test_bench_checks_its_numbers_before_loading_a_bundle(tmp_path):
    from rmt_export.bench import run_bench

    for kwargs, message in [(dict(threads=100_000), "threads must be an int in 1..1024"),
                            (dict(segments=0), "segments must be an int in 1..4096"),
                            (dict(repeats=10 ** 9), "repeats must be an int in 1..1000"),
                            (dict(batches=[8, 5000]), "a batch size must be an int in 1..4096")]:
        arguments = dict(bundles=[tmp_path / "absent"], checkpoint=None, batches=[1], segments=1, repeats=1,
                         threads=1, graphs=("ingest",), say=print)
        with pytest.raises(LimitError, match=message.replace(".", r"\.")):
            run_bench(**{**arguments, **kwargs})


def test_the_triton_client_checks_its_numbers_before_connecting():
    from rmt_runtime.triton_client import TritonSequence, TritonRMTClient

    for timeout in (0, -1, float("nan"), float("inf"), 10 ** 9, True):
        with pytest.raises(LimitError, match="timeout_s must be a finite number in"):
            TritonRMTClient("127.0.0.1:1", timeout_s=timeout)
    with pytest.raises(LimitError, match=r"sequence_id must be an int in 1\.\.9223372036854775807"):
        TritonSequence(None, 2 ** 63, keep_state=False)


def test_rmt_model_and_the_runtime_declare_the_same_bounds():
    """rmt_model may not import rmt_runtime, so it keeps its own numbers: they must be these."""
    from rmt_model import checkpoint, config

    assert config.MAX_NUM_MEM_TOKENS == limits.NUM_MEM_TOKENS.high
    assert config.MAX_SEGMENT_SIZE == limits.SEGMENT_SIZE.high
    assert checkpoint.CONFIG_BYTES == limits.CONFIG_BYTES
    assert checkpoint.memory_bytes() == limits.physical_memory()


@pytest.mark.parametrize("field, value, message", [
    ("segment_size", 10 ** 6, "segment_size must be an integer >= 1 and at most 65536"),
    ("segment_size", True, "segment_size must be an integer"),
    ("num_mem_tokens", 5000, "num_mem_tokens must be an integer >= 1 and at most 4096"),
    ("num_mem_tokens", 2.0, "num_mem_tokens must be an integer"),
])
def test_a_config_beyond_its_geometry_bounds_is_refused_before_a_model_is_built(field, value, message):
    from rmt_model.errors import ConfigError
    from rmt_model.tiny import tiny_config

    with pytest.raises(ConfigError, match=message):
        tiny_config("gpt2").replace(**{field: value})


@pytest.mark.parametrize("key, value, message", [
    ("n_embd", 10 ** 6, "hidden size must be an integer >= 1 and at most 65536"),
    ("vocab_size", 10 ** 9, "vocab_size must be an integer >= 1 and at most 4194304"),
    ("vocab_size", True, "vocab_size must be an integer"),
])
def test_a_backbone_that_would_allocate_without_bound_is_refused(key, value, message):
    from rmt_model.errors import ConfigError
    from rmt_model.tiny import tiny_config

    config = tiny_config("gpt2")
    with pytest.raises(ConfigError, match=message):
        config.replace(backbone={**config.backbone, key: value})


# ---- files ------------------------------------------------------------------------------------------
def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk (truncate)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def odd_files(tmp_path: Path) -> dict[str, Path]:
    """A directory, a FIFO, /dev/zero and a symlink to it: none a regular file."""
    (tmp_path / "a directory").mkdir()
    os.mkfifo(tmp_path / "a fifo")
    os.symlink("/dev/zero", tmp_path / "a link to dev zero")
    return {"a directory": tmp_path / "a directory", "a FIFO (named pipe)": tmp_path / "a fifo",
            "a character device": Path("/dev/zero"), "a link": tmp_path / "a link to dev zero"}


def in_a_subprocess(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter with a timeout: a read that blocks fails the test instead of
    hanging the suite. Its stdout."""
    try:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                                timeout=timeout, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked for {timeout} s (a FIFO read where a regular file was expected?)")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def gpt2(bundle_factory):
    return bundle_factory("gpt2", "fp32")[1].path


def _run(*args):
    from rmt_runtime.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def test_input_files_over_the_limit_are_refused_unread_and_nothing_runs(gpt2, tmp_path, monkeypatch):
    import rmt_runtime.cli

    loaded = []
    monkeypatch.setattr(rmt_runtime.cli.RMTRuntime, "load", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(rmt_runtime.cli, "load_tokenizer", lambda *a: object())  # --text-file: read the text next
    big = sparse(tmp_path / "big.txt", limits.INPUT_BYTES + 1)
    for option in ("--ids", "--text-file"):
        result = _run("--bundle", gpt2, option, big)
        assert result.exit_code == 1 and f"{big}: is {limits.INPUT_BYTES + 1:,} bytes; an input file is limited " \
                                          "to 64 MiB" in result.output, result.output
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(5)[None])
    result = _run("--bundle", gpt2, "--ids", ids, "--mask", big)
    assert result.exit_code == 1 and "is limited to 64 MiB" in result.output
    assert loaded == []
    assert big.stat().st_blocks == 0 or big.stat().st_blocks * 512 < limits.INPUT_BYTES  # sparse: no disk used


@pytest.mark.parametrize("source", ["/dev/zero", "link"])
def test_a_device_or_a_link_to_one_is_read_up_to_the_limit_then_refused(gpt2, tmp_path, source):
    path = Path("/dev/zero") if source == "/dev/zero" else tmp_path / "zeros"
    if source == "link":
        os.symlink("/dev/zero", path)
    result = _run("--bundle", gpt2, "--ids", path)
    assert result.exit_code == 1
    assert f"{path}: holds more than {limits.INPUT_BYTES:,} bytes; an input file is limited to 64 MiB" in result.output


def test_stdin_is_capped_while_read(gpt2):
    """A real rmt-run reading /dev/zero on stdin stops at the limit: one error line, no traceback."""
    with open("/dev/zero", "rb") as zeros:
        result = subprocess.run([str(BIN / "rmt-run"), "--bundle", str(gpt2), "--ids", "-"], stdin=zeros,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"stdin: holds more than {limits.INPUT_BYTES:,} bytes; an input file is limited to 64 MiB" in result.stderr
    capped = in_a_subprocess("""
        import sys
        from rmt_runtime import limits
        sys.stdin = open("/dev/zero")
        try:
            limits.read_input("-", 1 << 20, "an input")
        except limits.TooLargeError as exc:
            print(exc)
    """)
    assert "stdin: holds more than 1,048,576 bytes; an input is limited to 1 MiB" in capped


def test_a_directory_given_as_input_is_named(gpt2, tmp_path):
    result = _run("--bundle", gpt2, "--ids", tmp_path)
    assert result.exit_code == 1 and f"{tmp_path}: is a directory, not an input file" in result.output


def test_a_tokenizer_that_is_not_a_bounded_regular_file_is_refused_unread(tmp_path):
    """rmt-run --text and rmt-generate --prompt read tokenizer.json through one function."""
    files = odd_files(tmp_path)
    code = f"""
        import os, types
        from pathlib import Path
        from rmt_runtime import limits
        from rmt_runtime.cli import CliInputError, load_tokenizer
        for name, path in {[(k, str(v)) for k, v in files.items()]!r}:
            folder = Path({str(tmp_path)!r}) / ("bundle of " + name.replace("/", "_"))
            folder.mkdir()
            os.symlink(path, folder / "tokenizer.json")
            try:
                load_tokenizer(types.SimpleNamespace(path=folder, tokenizer_files=["tokenizer.json"]))
            except CliInputError as exc:
                print(exc)
        folder = Path({str(tmp_path)!r}) / "big"
        folder.mkdir()
        with open(folder / "tokenizer.json", "wb") as handle:
            handle.truncate(limits.TOKENIZER_BYTES + 1)
        try:
            load_tokenizer(types.SimpleNamespace(path=folder, tokenizer_files=["tokenizer.json"]))
        except CliInputError as exc:
            print(exc)
    """
    lines = in_a_subprocess(code).splitlines()
    assert len(lines) == 5, lines
    for line, kind in zip(lines, ["is a directory", "is a FIFO (named pipe)", "is a character device",
                                  "is a character device"]):
        assert "tokenizer.json: " + kind in line and "expected a tokenizer.json (a regular file)" in line
    assert "tokenizer.json: is 134,217,729 bytes; a tokenizer.json is limited to 128 MiB" in lines[4]


def test_checkpoints_and_configs_that_are_not_bounded_regular_files_are_refused_unread(tmp_path):
    """Every reader of rmt_model's checkpoint side, on every odd file, in a process that must not block."""
    files = odd_files(tmp_path)
    memory = limits.physical_memory()
    sparse(tmp_path / "huge.pt", memory + 1)
    sparse(tmp_path / "huge.safetensors", memory + 1)
    sparse(tmp_path / "config.json", limits.CONFIG_BYTES + 1)
    index = tmp_path / "shards" / "model.safetensors.index.json"
    index.parent.mkdir()
    sparse(index, limits.CONFIG_BYTES + 1)
    code = f"""
        from pathlib import Path
        from rmt_model.checkpoint import (CheckpointError, load_checkpoint, read_state_dict, read_torch_file,
                                          import_reference_checkpoint)
        odd = {[str(v) for v in files.values()]!r}
        tmp = Path({str(tmp_path)!r})

        def attempt(call):
            try:
                call()
            except CheckpointError as exc:
                print(exc)
            else:
                print("accepted")

        for path in odd:
            attempt(lambda: read_torch_file(path))
            attempt(lambda: load_checkpoint(path))
            attempt(lambda: import_reference_checkpoint(tmp / "huge.pt", path, num_mem_tokens=2, segment_size=8))
        for path in odd[1:]:
            (tmp / "as.safetensors").unlink(missing_ok=True)
            (tmp / "as.safetensors").symlink_to(path)
            attempt(lambda: read_state_dict(tmp / "as.safetensors"))
        attempt(lambda: read_torch_file(tmp / "huge.pt"))
        attempt(lambda: read_state_dict(tmp / "huge.safetensors"))
        attempt(lambda: read_state_dict(tmp / "shards"))
        from rmt_model.checkpoint import _read_backbone_config
        attempt(lambda: _read_backbone_config(tmp / "config.json"))
        for path in odd:
            attempt(lambda: _read_backbone_config(path))
    """
    lines = in_a_subprocess(code, timeout=300).splitlines()
    assert "accepted" not in lines
    kinds = ["a directory", "a FIFO (named pipe)", "a character device", "a character device"]
    for number, kind in enumerate(kinds):
        for line in lines[3 * number:3 * number + 2]:  # read_torch_file, load_checkpoint
            assert f"is {kind}, expected a checkpoint file (a regular file)" in line, line
        # the reference import reads the weights first: the huge one is refused by its size
        assert "huge.pt: is" in lines[3 * number + 2] and "more than this machine's memory" in lines[3 * number + 2]
    for line, kind in zip(lines[12:15], kinds[1:]):
        assert f"as.safetensors: is {kind}, expected a safetensors file (a regular file)" in line, line
    assert f"huge.pt: is {memory + 1:,} bytes, more than this machine's memory" in lines[15]
    assert f"huge.safetensors: is {memory + 1:,} bytes, more than this machine's memory" in lines[16]
    assert f"model.safetensors.index.json: is {limits.CONFIG_BYTES + 1:,} bytes, more than the limit" in lines[17]
    assert f"config.json: is {limits.CONFIG_BYTES + 1:,} bytes, more than the limit" in lines[18]
    for line, kind in zip(lines[19:], kinds):
        assert f"is {kind}, expected a backbone config.json (a regular file)" in line, line
    assert len(lines) == 23, lines


def test_the_export_refuses_a_validation_text_or_tokenizer_file_that_is_not_a_bounded_regular_one(
        tmp_path, tiny_checkpoint):
    """rmt-export as a process (a FIFO must not block it): --validation-text, and --tokenizer files."""
    from rmt_export.errors import ExportError
    from rmt_export.exporter import ExportOptions

    tokenizers = tmp_path / "tokenizer"
    tokenizers.mkdir()
    (tokenizers / "tokenizer.json").write_text("{}")
    files = odd_files(tmp_path)
    big_text = sparse(tmp_path / "big.txt", limits.INPUT_BYTES + 1)
    for name, path in [*files.items(), ("big", big_text)]:
        if name == "a directory":
            continue  # click refuses a directory for --validation-text itself
        result = subprocess.run([str(BIN / "rmt-export"), "--ckpt", str(tiny_checkpoint[0]), "--out",
                                 str(tmp_path / "out"), "--tokenizer", str(tokenizers), "--validation-text", str(path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        expected = "is limited to 64 MiB" if name == "big" else "is not a file"  # ExportOptions checks the kind
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
    os.symlink("/dev/zero", tokenizers / "vocab.json")
    with pytest.raises(ExportError, match=r"tokenizer file .*vocab.json: is a character device, expected a tokenizer"):
        ExportOptions(tokenizer_dir=tokenizers).check()
    (tokenizers / "vocab.json").unlink()
    sparse(tokenizers / "merges.txt", limits.TOKENIZER_BYTES + 1)
    with pytest.raises(ExportError, match=r"merges.txt: is 134,217,729 bytes; a tokenizer file is limited to 128 MiB"):
        ExportOptions(tokenizer_dir=tokenizers).check()


def test_the_library_readers_name_the_file_the_kind_and_the_limit(tmp_path):
    files = odd_files(tmp_path)
    for kind, path in files.items():
        if kind == "a FIFO (named pipe)":
            continue  # opened non-blocking: covered in a subprocess by the tokenizer test
        with pytest.raises(LimitError, match="expected a config"):
            limits.read_regular(path, 10, "a config")
    sparse(tmp_path / "eleven", 11)
    with pytest.raises(limits.TooLargeError, match=r"eleven: is 11 bytes; a config is limited to 10 bytes"):
        limits.read_regular(tmp_path / "eleven", 10, "a config")
    (tmp_path / "ten").write_bytes(b"0123456789")
    assert limits.read_regular(tmp_path / "ten", 10, "a config") == b"0123456789"
    assert limits.read_input(str(tmp_path / "ten"), 10)[0] == b"0123456789"


@pytest.mark.parametrize("option", ["--ids", "--mask"])
def test_an_npy_header_that_declares_more_than_the_file_holds_is_refused_unallocated(gpt2, tmp_path, option):
    """numpy allocates what a .npy header declares before reading: a 100-byte file claiming 10^12
    elements is refused on its header (a number a file supplies, bounded by the bytes it has)."""
    import io as _io

    header = _io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (1, 10 ** 12)})
    lie = tmp_path / "lie.npy"
    lie.write_bytes(header.getvalue() + bytes(40))
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(5)[None])
    result = _run("--bundle", gpt2, "--ids", lie) if option == "--ids" else _run("--bundle", gpt2, "--ids", ids,
                                                                                 "--mask", lie)
    assert result.exit_code == 1, result.output
    assert "lie.npy: its .npy header declares int64 [1, 1000000000000] (8,000,000,000,000 bytes), but only 40 " \
           "bytes follow it" in result.output


@pytest.mark.parametrize("sample, argv, message", [
    ("train_sample", ["--steps", "10000000"], "--steps must be an int in 1..1000000"),
    ("train_encoder_sample", ["--max-segments", "0"], "--max-segments must be an int in 1..4096"),
    ("train_armt_sample", ["--seed", "-1"], "--seed must be an int in 0..18446744073709551615"),
    ("demo", ["--examples", "1e9"], "'1e9' is not an integer"),
    ("accuracy_table", ["--segments", "1", "99999"], "--segments must be an int in 1..4096"),
])
def test_the_samples_command_lines_take_the_same_bounds(sample, argv, message):
    """Each sample as a process: its argparse option refuses the value (exit 2) before it trains or exports."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(root / "samples" / f"{sample}.py"), *argv], capture_output=True,
                            text=True, timeout=300, cwd=root)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_rmt_export_of_a_fifo_or_a_device_checkpoint_is_one_error_line_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    os.symlink("/dev/zero", tmp_path / "zeros.pt")
    for name, kind in (("model.pt", "a FIFO (named pipe)"), ("zeros.pt", "a character device")):
        try:
            result = subprocess.run([str(BIN / "rmt-export"), "--ckpt", str(tmp_path / name)], capture_output=True,
                                    text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rmt-export --ckpt {name} blocked for 120 s")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{name}: is {kind}, expected a checkpoint file (a regular file)" in result.stderr, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "zeros.pt"]
