"""ARMT checkpoints: rmt-edge's own file, and import of the reference code's state dicts in each
key layout (built here with tiny shapes by renaming a model's own state dict): the GPT-2 and
Llama wrappers, an older class's memory_cell.layers.* duplicates, the Hugging Face format's
``armt.`` prefix with its ARMT config.json, and Llama LoRA adapters merged with alpha / r."""
import json

import pytest
import torch

from rmt_model import CheckpointError, import_armt_checkpoint, load_checkpoint, save_checkpoint

from .test_armt import NEWER, OLDER, make_armt, max_diff, token_ids

LAYERS = {"gpt2": "transformer.h", "llama": "model.layers"}


def outputs(model, length=40):
    ids = token_ids(2, length)
    with torch.no_grad():
        return model(ids)


def assert_same(a, b, atol=0.0):
    x, y = outputs(a), outputs(b)
    assert max_diff(x.logits, y.logits) <= atol
    for name, value in x.state.items():
        assert max_diff(value, y.state[name]) <= atol, name


def reference_layout(model, prefix="", duplicates=False):
    """The reference AssociativeRecurrentWrapper's state dict of the same weights: every key of
    ours under memory_cell. (memory, sink, model.<layers>.{i}.W_m*/layer.*), plus ``prefix``."""
    out = {f"{prefix}memory_cell.{k}": v.clone() for k, v in model.state_dict().items()}
    if duplicates:  # older classes registered the wrapped layers a second time as memory_cell.layers
        layers = f"{prefix}memory_cell.model.{LAYERS[model.config.family]}."
        out.update({f"{prefix}memory_cell.layers." + k[len(layers):]: v.clone() for k, v in list(out.items())
                    if k.startswith(layers)})
    return out


def write_backbone(model, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model.config.backbone))
    return path


def test_an_armt_checkpoint_rebuilds_the_same_model_from_the_file_alone(tmp_path):
    model = make_armt("llama", **NEWER)
    save_checkpoint(model, tmp_path / "armt.pt")
    loaded = load_checkpoint(tmp_path / "armt.pt")
    assert type(loaded).__name__ == "ARMTDecoder" and loaded.config == model.config
    assert loaded.config.armt.heads == 2 and loaded.config.armt.use_sink
    assert_same(model, loaded)


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    torch.save({"format": "rmt-edge/checkpoint", "thing": torch.nn.Linear(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("family, settings, version", [("gpt2", NEWER, "normalized"),
                                                       ("gpt2", OLDER, "unnormalized"),
                                                       ("llama", NEWER, "normalized")])
def test_the_reference_layout_imports_exactly_reading_its_geometry_off_the_tensors(tmp_path, family, settings,
                                                                                     version):
    model = make_armt(family, **settings)
    ref = reference_layout(model)
    assert "memory_cell.memory" in ref
    assert f"memory_cell.model.{LAYERS[family]}.1.W_mb.bias" in ref
    assert f"memory_cell.model.{LAYERS[family]}.0.layer." + (
        "attn.c_attn.weight" if family == "gpt2" else "self_attn.q_proj.weight") in ref
    torch.save(ref, tmp_path / "armt.bin")
    notes = []
    imported = import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16,
                                      version=version, note=notes.append)
    assert imported.config.armt == model.config.armt and imported.config.num_mem_tokens == 4
    assert_same(model, imported)
    assert notes and "tensors from" in notes[0]


def test_older_duplicates_are_dropped_and_the_tied_head_may_be_absent(tmp_path):
    model = make_armt("gpt2", **OLDER)
    ref = reference_layout(model, duplicates=True)
    assert any(k.startswith("memory_cell.layers.0.W_mq") for k in ref)
    del ref["memory_cell.model.lm_head.weight"]
    torch.save(ref, tmp_path / "armt.bin")
    notes = []
    imported = import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16,
                                      version="unnormalized", note=notes.append)
    assert_same(model, imported)
    assert "dropped" in notes[0] and "duplicate memory_cell.layers" in notes[0]


def test_the_hugging_face_format_with_its_armt_config_json(tmp_path):
    model = make_armt("llama", **NEWER)
    ref = reference_layout(model, prefix="armt.")
    assert "armt.memory_cell.sink" in ref
    torch.save({k: v.to(torch.bfloat16) for k, v in ref.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "armt", "base_model_config": model.config.backbone, "num_mem_tokens": 4, "d_mem": 8,
        "segment_size": 16, "use_sink": True, "n_heads": 2, "correction": True, "wrap_pos": False}))
    notes = []
    imported = import_armt_checkpoint(tmp_path, tmp_path / "config.json", note=notes.append)
    assert imported.config.segment_size == 16 and imported.config.armt == model.config.armt
    rounded = make_armt("llama", **NEWER)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert_same(rounded, imported)
    assert "bfloat16 weights converted to float32" in notes[0]


def test_an_armt_config_json_that_contradicts_the_tensors_or_needs_unsupported_options_is_refused(tmp_path):
    model = make_armt("gpt2", **NEWER)
    torch.save(reference_layout(model), tmp_path / "armt.bin")
    config = {"model_type": "armt", "base_model_config": model.config.backbone, "segment_size": 16}
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_heads": 4}))
    with pytest.raises(CheckpointError, match="says heads=4 but .* holds heads=2"):
        import_armt_checkpoint(tmp_path / "armt.bin", tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**config, "wrap_pos": True}))
    with pytest.raises(CheckpointError, match="wrap_pos=True is not supported"):
        import_armt_checkpoint(tmp_path / "armt.bin", tmp_path / "config.json")


def test_llama_lora_adapters_are_merged_with_alpha_over_r(tmp_path):
    model = make_armt("llama", **NEWER)
    ref = reference_layout(model)
    generator = torch.Generator().manual_seed(9)
    alpha, rank = 16.0, 4
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            stem = f"memory_cell.model.model.layers.{layer}.layer.self_attn.{proj}"
            weight = ref.pop(f"{stem}.weight")
            lora_a = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            lora_b = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
            # PEFT layout: the base model under base_model.model, the base weight under base_layer.
            peft = stem.replace("memory_cell.model.", "memory_cell.model.base_model.model.")
            ref[f"{peft}.base_layer.weight"] = weight - alpha / rank * lora_b @ lora_a
            ref[f"{peft}.lora_A.default.weight"] = lora_a
            ref[f"{peft}.lora_B.default.weight"] = lora_b
    torch.save(ref, tmp_path / "armt.bin")
    with pytest.raises(CheckpointError, match="holds 4 LoRA adapters .* pass lora_alpha"):
        import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16)
    notes = []
    imported = import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16,
                                      lora_alpha=alpha, note=notes.append)
    assert "merged 4 LoRA adapters" in notes[0]
    assert_same(model, imported, atol=1e-5)
    wrong = import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16,
                                   lora_alpha=alpha / 2)
    assert max_diff(outputs(wrong).logits, outputs(model).logits) > 1e-3


def test_a_state_dict_that_does_not_fit_is_refused_by_name(tmp_path):
    model = make_armt("gpt2", **NEWER)
    ref = reference_layout(model)
    ref["memory_cell.model.transformer.h.0.W_mv.weight"] = torch.zeros(3, 3)
    ref["memory_cell.extra"] = torch.zeros(1)
    torch.save(ref, tmp_path / "armt.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['memory_cell.extra'\].*W_mv.weight \(3, 3\)"):
        import_armt_checkpoint(tmp_path / "armt.bin", write_backbone(model, tmp_path), segment_size=16)
    torch.save({"memory_cell.memory": torch.zeros(4, 32)}, tmp_path / "rmt.bin")
    with pytest.raises(CheckpointError, match="not an ARMT state dict"):
        import_armt_checkpoint(tmp_path / "rmt.bin", write_backbone(model, tmp_path), segment_size=16)
