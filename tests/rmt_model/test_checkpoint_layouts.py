"""The published reference checkpoints' file layouts, built with tiny shapes: a pickled
OrderedDict of bf16 tensors (reference trainer), model.safetensors + a config.json that holds
only max_n_segments (huggingface_hub's PyTorchModelHubMixin), pytorch_model.bin, and sharded
safetensors with model.safetensors.index.json. Each imports to the model it was made from;
each kind of bad file is one CheckpointError naming it."""
import collections
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from rmt_model import CheckpointError, import_reference_checkpoint

from .test_checkpoint import _reference_layout, outputs


@pytest.fixture
def model(make_model):
    return make_model("gpt2")


def _tensors(model, dtype=None):
    """The reference layout as safetensors stores it: contiguous, no shared storage (the mixin
    drops the tied LM head, keeping the embedding), optionally cast."""
    ref = {k: v for k, v in _reference_layout(model).items() if not k.endswith("lm_head.weight")}
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
            for k, v in ref.items()}


def _import(path, model, tmp_path, **kwargs):
    (tmp_path / "gpt2-config.json").write_text(json.dumps(model.config.backbone))
    return import_reference_checkpoint(path, tmp_path / "gpt2-config.json", num_mem_tokens=4, segment_size=16,
                                       **kwargs)


def _same_outputs(a, b, atol=0.0):
    x, y = outputs(a), outputs(b)
    torch.testing.assert_close(x.logits, y.logits, rtol=0, atol=atol)
    torch.testing.assert_close(x.memory, y.memory, rtol=0, atol=atol)


def _bf16_copy(model):
    """The model with its weights rounded to bf16 and back: what a bf16 checkpoint holds."""
    rounded = type(model)(model.config)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    return rounded.eval()


def test_a_pickled_ordered_dict_of_bf16_tensors_imports_and_says_it_converted(model, tmp_path):
    ref = collections.OrderedDict((k, v.to(torch.bfloat16) if v.is_floating_point() else v)
                                  for k, v in _reference_layout(model).items())
    torch.save(ref, tmp_path / "rmt.bin")
    notes = []
    imported = _import(tmp_path / "rmt.bin", model, tmp_path, note=notes.append)
    assert imported.memory.dtype == torch.float32
    _same_outputs(_bf16_copy(model), imported)
    assert len(notes) == 1 and "bfloat16 weights converted to float32" in notes[0]


def test_the_hub_mixin_layout_imports_from_its_directory(model, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(_tensors(model), hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"max_n_segments": 4}))  # all the mixin writes
    notes = []
    _same_outputs(model, _import(hub, model, tmp_path, note=notes.append))
    assert "model.safetensors" in notes[0] and "converted" not in notes[0]


def test_pytorch_model_bin_in_a_directory_imports(model, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(_reference_layout(model), folder / "pytorch_model.bin")
    _same_outputs(model, _import(folder, model, tmp_path))


def _shard(model, folder, dtype=None):
    folder.mkdir()
    tensors = _tensors(model, dtype)
    names = sorted(tensors)
    halves = names[: len(names) // 2], names[len(names) // 2:]
    weight_map = {}
    for number, keys in enumerate(halves, start=1):
        shard = f"model-0000{number}-of-00002.safetensors"
        save_file({k: tensors[k] for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_safetensors_import_from_the_directory_or_the_index(model, tmp_path, dtype):
    _shard(model, tmp_path / "shards", dtype)
    expected = model if dtype is None else _bf16_copy(model)
    _same_outputs(expected, _import(tmp_path / "shards", model, tmp_path))
    _same_outputs(expected, _import(tmp_path / "shards" / "model.safetensors.index.json", model, tmp_path))


def test_a_shard_missing_from_the_directory_is_named(model, tmp_path):
    _shard(model, tmp_path / "shards")
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) \['model-00002-of-00002.safetensors'\] named in the "
                                              r"index are missing"):
        _import(tmp_path / "shards", model, tmp_path)


def test_an_index_placing_a_key_in_the_wrong_shard_is_named(model, tmp_path):
    weight_map = _shard(model, tmp_path / "shards")
    moved = next(k for k, shard in weight_map.items() if shard.startswith("model-00001"))
    weight_map[moved] = "model-00002-of-00002.safetensors"
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"lacks \\['{moved}'\\], which the index places there"):
        _import(tmp_path / "shards", model, tmp_path)


def test_an_index_naming_a_file_outside_its_directory_is_refused(model, tmp_path):
    weight_map = _shard(model, tmp_path / "shards")
    weight_map = {k: "../elsewhere.safetensors" for k in weight_map}
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="shard names must be files beside the index"):
        _import(tmp_path / "shards", model, tmp_path)


def _lying_header(path, change):
    """Rewrite a safetensors file's JSON header through ``change`` (same file otherwise)."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


@pytest.mark.parametrize("change", [
    lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[0, 10 ** 12]),
    lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[10 ** 6, 10 ** 6]),
], ids=["offsets-past-the-end", "shape-larger-than-its-bytes"])
def test_a_safetensors_header_that_lies_is_refused(model, tmp_path, change):
    save_file(_tensors(model), tmp_path / "model.safetensors")
    _lying_header(tmp_path / "model.safetensors", change)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        _import(tmp_path / "model.safetensors", model, tmp_path)


def test_keys_of_another_architecture_are_named(model, make_model, tmp_path):
    llama = make_model("llama")
    save_file({k: v.contiguous().clone() for k, v in _reference_layout(llama).items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not fit the gpt2 decoder RMT: missing keys"):
        _import(tmp_path / "model.safetensors", model, tmp_path)


def test_a_directory_without_a_known_layout_is_named(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"needs one of \['model.safetensors.index.json', 'model.safetensors', "
                                              r"'pytorch_model.bin'\]; it holds \['notes.txt'\]"):
        _import(tmp_path / "empty", model, tmp_path)
