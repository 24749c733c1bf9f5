"""Train the encoder sample: a tiny BERT RMT that classifies a long document by a key
stated only at its start (16 classes), through its memory.

    .venv/bin/python samples/train_encoder_sample.py [--steps 1200] [--out samples/keyclass]

Byte-level input (ids 0..255) with three extra ids framing each segment ([CLS] 256,
[SEP] 257, [PAD] 258). Segments are right-aligned as in the reference encoder, so the key
sits in the short first segment and the classifier reads the last one. As for the decoder
sample, an auxiliary loss reads each segment's new memory through the model's own pooler
and classifier (no extra parameters) so that memory learns to hold the key early.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rmt_model import RMTConfig, build_model, family_config_dict, save_checkpoint  # noqa: E402
from rmt_runtime import limits  # noqa: E402
from samples.byte_tokenizer import VOCAB_SIZE, save_tokenizer  # noqa: E402
from samples.training import optimise, report, set_cosine_rate  # noqa: E402
from samples.task import FILLER, KEYS  # noqa: E402

SEGMENT_SIZE, NUM_MEM_TOKENS = 32, 4
CLS, SEP, PAD = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2
LR = 1e-3


def encoder_config() -> RMTConfig:
    backbone = family_config_dict("bert", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB_SIZE + 3, pad_token_id=PAD,
                                  max_position_embeddings=SEGMENT_SIZE + NUM_MEM_TOKENS + 3,
                                  num_labels=len(KEYS), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0,
                                  id2label={i: k for i, k in enumerate(KEYS)},
                                  label2id={k: i for i, k in enumerate(KEYS)})
    return RMTConfig(kind="encoder", backbone=backbone, num_mem_tokens=NUM_MEM_TOKENS, segment_size=SEGMENT_SIZE,
                     cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)


def make_documents(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of ``length`` bytes starting "key=K;" and their class (the key's index)."""
    labels = rng.integers(len(KEYS), size=batch)
    docs = []
    for label in labels:
        text = f"key={KEYS[label]};" + "".join(rng.choice(list(FILLER), size=length - 6))
        docs.append(list(text.encode("ascii")))
    return np.array(docs, dtype=np.int64), labels.astype(np.int64)


def accuracy(model, segments: int, examples: int = 128, seed: int = 99) -> float:
    ids, labels = make_documents(np.random.default_rng(seed), examples, segments * SEGMENT_SIZE - 5)
    with torch.no_grad():
        return float((model(torch.from_numpy(ids)).logits.argmax(-1).numpy() == labels).mean())


def train(steps: int, seed: int, batch: int = 32, max_segments: int = 12, log=print):
    torch.manual_seed(seed)
    model = build_model(encoder_config()).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    backbone = model.model
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        segments = 2 if step <= 100 else int(rng.integers(2, max_segments + 1))
        set_cosine_rate(optimiser, step, steps, peak=LR, warmup_steps=50)  # post-norm BERT needs warm-up
        ids, labels = make_documents(rng, batch, segments * SEGMENT_SIZE - int(rng.integers(0, SEGMENT_SIZE - 8)))
        ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
        memory, auxiliary = model.initial_memory(batch), 0.0
        parts = model.segments(ids, torch.ones_like(ids))
        for chunk, mask in parts:
            logits, memory = model.step(chunk, mask, memory)
            auxiliary = auxiliary + F.cross_entropy(backbone.classifier(backbone.bert.pooler(memory)), labels)
        task = F.cross_entropy(logits, labels)
        loss = task + 0.5 * auxiliary / len(parts)
        optimise(model, optimiser, loss)
        report(model, step, steps, task, accuracy, started, log)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=limits.argparse_type(limits.TRAINING_STEPS, "--steps"), default=1200)
    parser.add_argument("--seed", type=limits.argparse_type(limits.SEED, "--seed"), default=0)
    parser.add_argument("--max-segments", type=limits.argparse_type(limits.LENGTH_SEGMENTS, "--max-segments"),
                        default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "keyclass")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train(args.steps, args.seed, max_segments=args.max_segments)
    path = save_checkpoint(model, args.out / "model.pt")
    save_tokenizer(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB); accuracy at 32 segments {accuracy(model, 32):.3f}")


if __name__ == "__main__":
    main()
