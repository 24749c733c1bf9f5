"""Train the sample model: a tiny GPT-2 RMT that must carry a key through its memory.

Seeded and CPU-only; 1200 steps by default, about 30 minutes on 2 cores (400 steps took 10
minutes on this project's machine). Writes the checkpoint and the byte-level tokenizer
that ship in samples/:

    .venv/bin/python samples/train_sample.py [--steps 1200] [--out samples/keyrecall]

Training: the task loss (predict the key at the end of the last segment) plus an auxiliary
loss that reads each segment's new memory through the model's own (tied) LM head and asks
it to name the key. Without it the task sits on a long plateau (both the writer and the
reader of memory must appear at once); with it the memory learns to hold the key from the
first steps. The auxiliary loss uses no extra parameters: the checkpoint is a plain RMT.
Curriculum: 2 segments first, then 2..6, then 2..--max-segments; accuracy is measured up to 64 segments.
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
from samples.task import make_batch  # noqa: E402

SEGMENT_SIZE, NUM_MEM_TOKENS = 32, 4


def sample_config() -> RMTConfig:
    backbone = family_config_dict("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB_SIZE,
                                  n_positions=SEGMENT_SIZE + 2 * NUM_MEM_TOKENS, bos_token_id=None,
                                  eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return RMTConfig(kind="decoder", backbone=backbone, num_mem_tokens=NUM_MEM_TOKENS, segment_size=SEGMENT_SIZE)


def accuracy(model, segments: int, examples: int = 128, seed: int = 99) -> float:
    ids, answers = make_batch(np.random.default_rng(seed), examples, segments, SEGMENT_SIZE)
    with torch.no_grad():
        predicted = model(torch.from_numpy(ids)).logits[:, -1].argmax(-1).numpy()
    return float((predicted == answers).mean())


def train(steps: int, seed: int, batch: int = 32, max_segments: int = 12, log=print):
    torch.manual_seed(seed)
    model = build_model(sample_config()).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    head = model.model.get_output_embeddings()
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        segments = 2 if step <= 150 else int(rng.integers(2, 7 if step <= 400 else max_segments + 1))
        set_cosine_rate(optimiser, step, steps, peak=2e-3)  # decay to a tenth: a steadier memory at the end
        ids, answers = make_batch(rng, batch, segments, SEGMENT_SIZE)
        ids, answers = torch.from_numpy(ids), torch.from_numpy(answers)
        memory, auxiliary = model.initial_memory(batch), 0.0
        for start in range(0, ids.shape[1], SEGMENT_SIZE):
            chunk = ids[:, start:start + SEGMENT_SIZE]
            logits, memory = model.step(chunk, torch.ones_like(chunk), memory)
            auxiliary = auxiliary + F.cross_entropy(head(memory[:, 0]), answers)
        task = F.cross_entropy(logits[:, -1], answers)
        loss = task + 0.5 * auxiliary / segments
        optimise(model, optimiser, loss)
        report(model, step, steps, task, accuracy, started, log)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=limits.argparse_type(limits.TRAINING_STEPS, "--steps"), default=1200)
    parser.add_argument("--seed", type=limits.argparse_type(limits.SEED, "--seed"), default=0)
    parser.add_argument("--max-segments", type=limits.argparse_type(limits.LENGTH_SEGMENTS, "--max-segments"),
                        default=12, help="longest training input, in segments")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "keyrecall")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train(args.steps, args.seed, max_segments=args.max_segments)
    path = save_checkpoint(model, args.out / "model.pt")
    save_tokenizer(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) and {args.out / 'tokenizer.json'}")
    print("accuracy at 64 segments:", accuracy(model, 64))


if __name__ == "__main__":
    main()
