"""rmt-export on the published reference layouts: a hub directory of bf16 safetensors exports
with one log line saying what was converted; a bad shard set is one error line."""
import json

import numpy as np
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from rmt_export.cli import main
from rmt_runtime import RMTRuntime
from tests.cli.support import one_line_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _hub_directory(model, folder, dtype=torch.bfloat16):
    folder.mkdir()
    tensors = {("memory_cell.memory" if k == "memory" else f"memory_cell.{k}"): v.to(dtype).contiguous().clone()
               for k, v in model.state_dict().items() if not k.endswith("lm_head.weight")}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"max_n_segments": 4}))
    return folder


def test_a_bf16_hub_directory_exports_and_the_log_says_what_was_converted(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    hub = _hub_directory(model, tmp_path / "hub")
    (tmp_path / "gpt2.json").write_text(json.dumps(model.config.backbone))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")  # the backbone's tokenizer, beside its config
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    result = run("--ckpt", hub, "--out", tmp_path / "b", "--segments", 2, "--no-generation",
                 "--backbone-config", tmp_path / "gpt2.json", "--num-mem-tokens", 4, "--segment-size", 16)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[read]")]
    assert any("model.safetensors" in line and "bfloat16 weights converted to float32" in line for line in lines)
    assert f"[tokenizer] vocab.json, merges.txt from {tmp_path} (beside the backbone config)" in result.stderr
    assert RMTRuntime.load(tmp_path / "b").bundle.manifest["tokenizer"] == ["vocab.json", "merges.txt"]
    rt = RMTRuntime.load(tmp_path / "b")
    ids = np.arange(40) % 97
    rounded = type(model)(model.config)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected = rounded.eval()(torch.from_numpy(ids)[None])
    np.testing.assert_allclose(rt.run(ids).memory, expected.memory.numpy(), rtol=0, atol=1e-4)


def test_a_shard_index_with_a_missing_shard_is_one_error_line(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"memory_cell.memory": "model-00001-of-00002.safetensors"}}))
    (tmp_path / "gpt2.json").write_text(json.dumps(model.config.backbone))
    one_line_error(run("--ckpt", folder, "--out", tmp_path / "b", "--backbone-config", tmp_path / "gpt2.json",
                       "--num-mem-tokens", 4, "--segment-size", 16),
                   "shard(s) ['model-00001-of-00002.safetensors'] named in the index are missing")
    assert not (tmp_path / "b").exists()


def test_a_directory_without_its_layout_says_what_it_needs(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    hub = _hub_directory(model, tmp_path / "hub")
    one_line_error(run("--ckpt", hub, "--out", tmp_path / "b"), "needs its layout")
