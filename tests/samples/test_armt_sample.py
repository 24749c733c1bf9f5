"""The shipped ARMT sample (samples/keyrecall_armt): its geometry, a checkpoint round trip, and
that it carries the key through its associative memory (PyTorch only; no export)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_model import ARMTDecoder, load_checkpoint, save_checkpoint
from samples import train_armt_sample
from samples.byte_tokenizer import VOCAB_SIZE, save_tokenizer
from samples.task import make_batch

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "samples" / "keyrecall_armt" / "model.pt"


@pytest.fixture(scope="module")
def armt():
    return load_checkpoint(CHECKPOINT)


def test_shipped_armt_has_the_documented_geometry(armt):
    """What the sample documents, not the whole backbone dict (each transformers release adds keys
    to a GPT-2 config's defaults): every field the sample sets, and every other RMTConfig field."""
    config, expected = armt.config, train_armt_sample.sample_config()
    assert isinstance(armt, ARMTDecoder) and config.kind == "armt"
    others = [f.name for f in dataclasses.fields(config) if f.name != "backbone"]
    assert {n: getattr(config, n) for n in others} == {n: getattr(expected, n) for n in others}
    documented = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "bos_token_id", "eos_token_id",
                  "resid_pdrop", "embd_pdrop", "attn_pdrop", "model_type")
    assert {k: config.backbone.get(k) for k in documented} == {k: expected.backbone.get(k) for k in documented}
    assert (config.family, armt.num_layers, config.hidden_size) == ("gpt2", 2, 64)
    assert config.backbone["n_head"] == 4 and config.backbone["vocab_size"] == VOCAB_SIZE
    assert (config.num_mem_tokens, config.segment_size) == (4, 32)
    settings = config.armt
    assert (settings.d_mem, settings.heads, settings.use_sink, settings.correction, settings.version) == \
        (32, 2, True, True, "normalized")
    assert CHECKPOINT.stat().st_size < 1_000_000


def test_shipped_tokenizer_is_the_byte_tokenizer(tmp_path):
    shipped = CHECKPOINT.parent / "tokenizer.json"
    assert shipped.read_text() == save_tokenizer(tmp_path).read_text()


def test_shipped_armt_round_trips_through_a_checkpoint(armt, tmp_path):
    again = load_checkpoint(save_checkpoint(armt, tmp_path / "model.pt"))
    assert isinstance(again, ARMTDecoder) and again.config == armt.config
    ours, theirs = armt.state_dict(), again.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_shipped_armt_answers_through_memory_and_falls_to_chance_without_it(armt):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ids, keys = make_batch(np.random.default_rng(7), 64, 8, 32)
    assert (train_armt_sample.answers(armt, ids) == keys).mean() >= 0.9
    assert (train_armt_sample.answers(armt, ids, reset=True) == keys).mean() < 0.3


def test_armt_training_is_seeded():
    first = train_armt_sample.train(steps=2, seed=3, batch=4, log=lambda line: None)
    second = train_armt_sample.train(steps=2, seed=3, batch=4, log=lambda line: None)
    assert isinstance(first, ARMTDecoder) and not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
