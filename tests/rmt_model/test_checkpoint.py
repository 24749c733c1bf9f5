"""Checkpoints: bit-exact round trips, refusal of anything that is not plain weights, reference import."""
import json
import zipfile

import pytest
import torch

from rmt_model import CheckpointError, import_reference_checkpoint, load_checkpoint, save_checkpoint
from rmt_model.tiny import DECODER_FAMILIES, ENCODER_FAMILIES


def outputs(model, seed=3):
    ids = torch.randint(4, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_round_trip_is_bit_exact(make_model, tmp_path, family):
    model = make_model(family)
    path = save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    a, b = outputs(model), outputs(loaded)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.memory, b.memory)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


class _RunsCode:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(_RunsCode.marker),))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    _RunsCode.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format": "rmt-edge/checkpoint", "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused.*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"hello, not a checkpoint\n", "not a readable PyTorch checkpoint"),
])
def test_garbage_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(make_model, tmp_path):
    path = save_checkpoint(make_model("gpt2"), tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_zip_of_something_else_is_refused(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "just a zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_plain_state_dict_is_not_mistaken_for_a_checkpoint(make_model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"memory_cell.memory": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="reference RMT code"):
        load_checkpoint(path)


def test_newer_checkpoint_version_is_refused(make_model, tmp_path):
    path = save_checkpoint(make_model("gpt2"), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_named(make_model, tmp_path):
    path = save_checkpoint(make_model("gpt2"), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["memory"] = torch.zeros(7, 5)
    del payload["state_dict"]["model.transformer.ln_f.bias"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "model.transformer.ln_f.bias" in str(info.value)
    assert "memory (7, 5)" in str(info.value)


def _reference_layout(model):
    """The state dict the reference code would save for the same weights."""
    state = model.state_dict()
    if model.config.kind == "decoder":
        ref = {("memory_cell.memory" if k == "memory" else f"memory_cell.{k}"): v for k, v in state.items()}
        if model.config.family == "gpt2":  # buffers older transformers saved with GPT-2
            for layer in range(model.config.backbone["n_layer"]):
                ref[f"memory_cell.model.transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, 64, 64)
                ref[f"memory_cell.model.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
        return ref
    ref = dict(state)
    ref["mem_token_ids"] = model.mem_token_ids.clone()
    ref["cls_token"] = torch.tensor([model.config.cls_token_id])
    ref["sep_token"] = torch.tensor([model.config.sep_token_id])
    return ref


@pytest.mark.parametrize("family", DECODER_FAMILIES + ENCODER_FAMILIES)
def test_reference_state_dict_imports_to_the_same_outputs(make_model, tmp_path, family):
    model = make_model(family)
    cfg = model.config
    torch.save(_reference_layout(model), tmp_path / "rmt.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.backbone))
    encoder_ids = ({} if cfg.kind == "decoder" else
                   dict(cls_token_id=cfg.cls_token_id, sep_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id))
    imported = import_reference_checkpoint(tmp_path / "rmt.bin", tmp_path / "config.json",
                                           num_mem_tokens=cfg.num_mem_tokens, segment_size=cfg.segment_size,
                                           kind=cfg.kind, **encoder_ids)
    a, b = outputs(model), outputs(imported)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.memory, b.memory)


def test_reference_import_names_keys_that_do_not_fit(make_model, tmp_path):
    model = make_model("gpt2")
    ref = _reference_layout(model)
    ref["memory_cell.model.transformer.extra.weight"] = torch.zeros(3)
    del ref["memory_cell.model.transformer.wpe.weight"]
    torch.save(ref, tmp_path / "rmt.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.backbone))
    with pytest.raises(CheckpointError) as info:
        import_reference_checkpoint(tmp_path / "rmt.bin", tmp_path / "config.json",
                                    num_mem_tokens=model.config.num_mem_tokens, segment_size=16)
    message = str(info.value)
    assert "model.transformer.wpe.weight" in message and "model.transformer.extra.weight" in message


def test_reference_import_with_wrong_memory_count_is_refused(make_model, tmp_path):
    model = make_model("gpt2", num_mem_tokens=4)
    torch.save(_reference_layout(model), tmp_path / "rmt.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.backbone))
    with pytest.raises(CheckpointError, match=r"memory \(4, 32\) \(expected \(5, 32\)\)"):
        import_reference_checkpoint(tmp_path / "rmt.bin", tmp_path / "config.json",
                                    num_mem_tokens=5, segment_size=16)


def test_reference_import_checks_positions(make_model, tmp_path):
    model = make_model("gpt2")
    torch.save(_reference_layout(model), tmp_path / "rmt.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.backbone))
    with pytest.raises(CheckpointError, match="positions, but the gpt2 backbone has only 64"):
        import_reference_checkpoint(tmp_path / "rmt.bin", tmp_path / "config.json",
                                    num_mem_tokens=4, segment_size=60)
