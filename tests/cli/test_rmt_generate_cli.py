"""rmt-generate through click's CliRunner on tiny exported bundles."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from rmt_runtime import GenerationConfig, RMTRuntime
from rmt_runtime.generate_cli import main
from tests.cli.support import one_line_error

PROMPT = np.random.default_rng(3).integers(0, 97, size=37).astype(np.int64)


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("gpt2", initializer_range=0.2)[1].path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.npy"
    np.save(path, PROMPT)
    return path


def test_json_prints_the_tokens_the_api_generates(bundle, prompt_file):
    result = run("--bundle", bundle, "--prompt-ids", prompt_file, "--max-new-tokens", 30, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = RMTRuntime.load(bundle, backend="onnxruntime").generate(PROMPT, GenerationConfig(max_new_tokens=30))
    assert out["ok"] and out["tokens"] == expected.tokens[0] and out["new_tokens"] == 30
    assert out["prompt_tokens"] == 37 and out["text"] is None  # no tokenizer in this bundle
    assert out["segments_in_memory"] + 0 == (37 + 30 - 1) // 16 and out["pending"] == 37 + 30 - 16 * out["segments_in_memory"]


def test_tokens_stream_to_stdout_as_ids_without_a_tokenizer(bundle, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(" ".join(map(str, PROMPT)))
    streamed = run("--bundle", bundle, "--prompt-ids", ids_file, "--max-new-tokens", 12, "--temperature", 0.8,
                   "--seed", 5)
    assert streamed.exit_code == 0, streamed.output
    as_json = json.loads(run("--bundle", bundle, "--prompt-ids", ids_file, "--max-new-tokens", 12,
                             "--temperature", 0.8, "--seed", 5, "--json").stdout)
    assert [int(x) for x in streamed.stdout.split()] == as_json["tokens"]
    assert "37 prompt tokens, 12 new tokens" in streamed.stderr


def test_a_conversation_continues_across_invocations_with_state(bundle, tmp_path):
    state = tmp_path / "chat.npz"
    halves = PROMPT[:20], PROMPT[20:]
    outputs = []
    for number, half in enumerate(halves):
        path = tmp_path / f"turn{number}.npy"
        np.save(path, half)
        result = run("--bundle", bundle, "--prompt-ids", path, "--max-new-tokens", 9, "--state", state, "--json")
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout))
    assert outputs[1]["resumed"] and not outputs[0]["resumed"]
    rt = RMTRuntime.load(bundle, backend="onnxruntime")
    whole = np.concatenate([halves[0], outputs[0]["tokens"], halves[1]])
    assert outputs[1]["tokens"] == rt.generate(whole, GenerationConfig(max_new_tokens=9)).tokens[0]


def test_stop_token_ends_generation_early(bundle, prompt_file):
    free = json.loads(run("--bundle", bundle, "--prompt-ids", prompt_file, "--max-new-tokens", 20, "--json").stdout)
    stop = free["tokens"][4]
    first = free["tokens"].index(stop)
    stopped = json.loads(run("--bundle", bundle, "--prompt-ids", prompt_file, "--max-new-tokens", 20,
                             "--stop-token", stop, "--json").stdout)
    assert stopped["tokens"] == free["tokens"][:first + 1] and stopped["stopped"]


@pytest.mark.parametrize("flags, settings", [
    (["--temperature", 1.0, "--seed", 7], dict(temperature=1.0, seed=7)),
    (["--temperature", 1.0, "--seed", 7, "--top-k", 3], dict(temperature=1.0, seed=7, top_k=3)),
    (["--temperature", 1.0, "--seed", 7, "--top-p", 0.3], dict(temperature=1.0, seed=7, top_p=0.3)),
    (["--repetition-penalty", 3.0], dict(repetition_penalty=3.0)),
    (["--no-rollover"], dict(rollover=False)),
], ids=["temperature-seed", "top-k", "top-p", "repetition-penalty", "no-rollover"])
def test_each_sampling_flag_reaches_the_sampler(bundle, prompt_file, flags, settings):
    """The CLI's tokens equal the API's with the same settings, and differ from the API's
    without the last flag's setting (so the flag changed something)."""
    result = run("--bundle", bundle, "--prompt-ids", prompt_file, "--max-new-tokens", 20, *flags, "--json")
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.stdout)["tokens"]
    rt = RMTRuntime.load(bundle, backend="onnxruntime")
    assert tokens == rt.generate(PROMPT, GenerationConfig(max_new_tokens=20, **settings)).tokens[0]
    last = list(settings)[-1]
    without = {name: value for name, value in settings.items() if name != last}
    if last == "seed":
        without["seed"] = 8
    assert tokens != rt.generate(PROMPT, GenerationConfig(max_new_tokens=20, **without)).tokens[0]


def test_a_prompt_shaped_one_by_n_is_one_prompt_and_a_batch_is_refused(bundle, prompt_file, tmp_path):
    np.save(tmp_path / "row.npy", PROMPT[None])  # a tokenizer's return_tensors="np" shape
    flat = json.loads(run("--bundle", bundle, "--prompt-ids", prompt_file, "--max-new-tokens", 8, "--json").stdout)
    row = json.loads(run("--bundle", bundle, "--prompt-ids", tmp_path / "row.npy", "--max-new-tokens", 8,
                         "--json").stdout)
    assert row["tokens"] == flat["tokens"] and row["prompt_tokens"] == 37
    np.save(tmp_path / "batch.npy", np.stack([PROMPT, PROMPT]))
    one_line_error(run("--bundle", bundle, "--prompt-ids", tmp_path / "batch.npy"),
                   "rmt-generate takes one prompt ([N] or [1, N]), got 2 rows")


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "hello"], ["has no tokenizer", "--prompt-ids"]),
    (["--prompt", "hello", "--prompt-ids", "x.txt"], ["give one input, not --prompt and --prompt-ids"]),
    (["--stop-token", "3", "--no-stop"], ["--stop-token or --no-stop"]),
    (["--prompt-ids", "-", "--stop-token", "500"], ["stop tokens [500] are outside the vocabulary 0..96"]),
    (["--prompt-ids", "-", "--no-rollover", "--max-new-tokens", "100"], ["past the backbone's 64 positions"]),
])
def test_bad_invocations_fail_with_one_line(bundle, args, fragments):
    one_line_error(run("--bundle", bundle, *args, input="1 2 3"), *fragments)


def test_an_encoder_bundle_is_refused(bundle_factory):
    one_line_error(run("--bundle", bundle_factory("bert")[1].path, "--prompt-ids", "-", input="5 6"),
                   "is an encoder", "needs a decoder bundle")
