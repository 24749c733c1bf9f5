"""Train the ARMT sample: a tiny GPT-2 Associative Recurrent Memory Transformer on the same
key-recall task as the RMT sample (samples/train_sample.py), to show how much longer the
associative memory holds the key.

Seeded and CPU-only; 2000 steps by default, which took 26 minutes (1578 s) on 1 thread of this
project's 2-core machine shared with other work (about 0.6 s a step alone, 1 s when contended).
Exact at 2..32 segments from step 600. Writes the checkpoint and the byte-level tokenizer:

    .venv/bin/python samples/train_armt_sample.py [--steps N] [--out samples/keyrecall_armt]
    .venv/bin/python samples/train_armt_sample.py --evaluate [--examples 200]

Model (136k parameters, a 558 kB checkpoint): GPT-2, 2 layers, d 64, 4 attention heads,
segment 32, M = 4 memory tokens (as the RMT sample); per layer an associative memory of
d_mem 32 over 2 memory heads (DPFP features 96 wide per head: W_mem [2, 96, 32]), a sink token,
the "normalized" ARMT version (the default) with the gamma correction.

Training: full backprop through every segment with ``ARMTDecoder.step`` (state dict), two
losses, neither with extra parameters (the checkpoint is a plain ARMT):

* the task loss at EVERY depth, not only at the end: after each written segment the example's
  own question segment (filler + "?key=") is read from the current state with ``write=False``
  (what the model sees at the end of an input that many segments long: its memory tokens come
  after the question and cannot change its logits) and the key's cross-entropy is averaged
  over depths 2..S. Each training input of S segments is also S-1 shorter inputs, and the
  longer ones ask the memory to keep the key while filler segments write.
* an auxiliary loss like the RMT sample's: the memory tokens' final hidden states of every
  written segment, read through the model's own (tied) LM head, must name the key (weight
  0.5). The ARMT carries no memory-token outputs forward, but those outputs are what each
  layer writes into W_mem, so this teaches the writer to attend to the key from the first
  steps, and in later segments to read it back from memory and rewrite it (delta rule: a
  value equal to what is stored changes nothing). Without it (seed 0, 2..8 segments) the
  task loss sat at chance (ln 16) for 300 steps; with it accuracy rose from about step 150.
  The memory tokens' hidden states are taken by a forward hook on the backbone's final norm
  (GPT-2's ``transformer.ln_f``), removed when training ends.

W_mv starts at N(0, 0.02^2) (W_MV_STD) instead of the reference's zeros, so W_mq/W_mk get gradient at
once (with W_mv = 0 they get none until W_mv has moved). Curriculum: 2..4 segments for 150
steps, then 2..8 until step 400, then 2..--max-segments; cosine rate from 2e-3 to a tenth.

--evaluate prints accuracy at 2..128 segments for the shipped RMT sample
(samples/keyrecall/model.pt), this ARMT, and this ARMT with its state reset at every segment
(must fall to chance, 1/16), each on the same inputs: make_batch(default_rng(99)), 200 examples
per length. The shipped checkpoint (seed 0, 2000 steps, trained on 2..16 segments):

    | segments           | 2     | 4     | 8     | 16    | 32    | 64    | 128   |
    | RMT sample         | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 0.720 | 0.390 |
    | ARMT               | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 0.945 | 0.890 |
    | ARMT, reset        | 0.045 | 0.085 | 0.045 | 0.075 | 0.050 | 0.070 | 0.045 |
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
from rmt_model import (ARMTSettings, RMTConfig, build_armt_model, family_config_dict,  # noqa: E402
                       load_checkpoint, save_checkpoint)
from rmt_runtime import limits  # noqa: E402
from samples.byte_tokenizer import VOCAB_SIZE, save_tokenizer  # noqa: E402
from samples.training import optimise, report, set_cosine_rate  # noqa: E402
from samples.task import CHANCE, make_batch  # noqa: E402

HERE = Path(__file__).resolve().parent
SEGMENT_SIZE, NUM_MEM_TOKENS = 32, 4
D_MEM, MEM_HEADS = 32, 2
W_MV_STD = 0.02
EVAL_SEGMENTS = (2, 4, 8, 16, 32, 64, 128)
RMT_CHECKPOINT = HERE / "keyrecall" / "model.pt"
ARMT_OUT = HERE / "keyrecall_armt"


def sample_config() -> RMTConfig:
    backbone = family_config_dict("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB_SIZE,
                                  n_positions=SEGMENT_SIZE + 2 * NUM_MEM_TOKENS, bos_token_id=None,
                                  eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return RMTConfig(kind="armt", backbone=backbone, num_mem_tokens=NUM_MEM_TOKENS, segment_size=SEGMENT_SIZE,
                     armt=ARMTSettings(d_mem=D_MEM, heads=MEM_HEADS, use_sink=True, version="normalized"))


def build(seed: int, w_mv_std: float = W_MV_STD):
    torch.manual_seed(seed)
    model = build_armt_model(sample_config())
    if w_mv_std:
        with torch.no_grad():
            for layer in model._layers():
                layer.W_mv.weight.normal_(0.0, w_mv_std)
    return model


def answers(model, ids: np.ndarray, reset: bool = False) -> np.ndarray:
    """The predicted key of each row: the full recurrence, or (reset) the initial state/memory
    fed to every segment. Works for an RMTDecoder and an ARMTDecoder."""
    size = model.config.segment_size
    tokens = torch.from_numpy(ids)
    with torch.no_grad():
        if not reset:
            return model(tokens).logits[:, -1].argmax(-1).numpy()
        initial = (model.initial_state if hasattr(model, "initial_state") else model.initial_memory)(ids.shape[0])
        for start in range(0, ids.shape[1], size):
            chunk = tokens[:, start:start + size]
            logits, _ = model.step(chunk, torch.ones_like(chunk), initial)
    return logits[:, -1].argmax(-1).numpy()


def accuracy(model, segments: int, examples: int = 128, seed: int = 99, reset: bool = False) -> float:
    ids, keys = make_batch(np.random.default_rng(seed), examples, segments, SEGMENT_SIZE)
    return float((answers(model, ids, reset) == keys).mean())


def evaluate(armt_path: Path, rmt_path: Path = RMT_CHECKPOINT, examples: int = 200, seed: int = 99,
             segments=EVAL_SEGMENTS, log=print) -> list[dict]:
    """Accuracy of the RMT sample, the ARMT and the ARMT reset every segment, on the same inputs."""
    rmt, armt = load_checkpoint(rmt_path), load_checkpoint(armt_path)
    rows = []
    log(f"| segments | tokens | RMT sample | ARMT | ARMT, state reset every segment (chance {CHANCE:.3f}) |")
    log("|---|---|---|---|---|")
    for n in segments:
        ids, keys = make_batch(np.random.default_rng(seed), examples, n, SEGMENT_SIZE)
        row = {"segments": n, "rmt": float((answers(rmt, ids) == keys).mean()),
               "armt": float((answers(armt, ids) == keys).mean()),
               "armt_reset": float((answers(armt, ids, reset=True) == keys).mean())}
        rows.append(row)
        log(f"| {n} | {n * SEGMENT_SIZE} | {row['rmt']:.3f} | {row['armt']:.3f} | {row['armt_reset']:.3f} |")
    return rows


def curriculum(step: int, rng: np.random.Generator, max_segments: int) -> int:
    if step <= 150:
        return int(rng.integers(2, 5))
    return int(rng.integers(2, (9 if step <= 400 else max_segments + 1)))


def train(steps: int, seed: int, batch: int = 32, max_segments: int = 16, peak: float = 2e-3,
          w_mv_std: float = W_MV_STD, aux_weight: float = 0.5, log=print):
    model = build(seed, w_mv_std).train()
    head = model.model.get_output_embeddings()
    final = []  # the final norm's output of the last backbone call: [B, P, D]
    hook = model.model.transformer.ln_f.register_forward_hook(lambda module, args, out: final.append(out))
    optimiser = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        segments = curriculum(step, rng, max_segments)
        set_cosine_rate(optimiser, step, steps, peak=peak, warmup_steps=50)
        ids, keys = make_batch(rng, batch, segments, SEGMENT_SIZE)
        ids, keys = torch.from_numpy(ids), torch.from_numpy(keys)
        question = ids[:, (segments - 1) * SEGMENT_SIZE:]
        ones = torch.ones_like(question)
        state, losses, auxiliary = model.initial_state(batch), [], []
        for start in range(0, (segments - 1) * SEGMENT_SIZE, SEGMENT_SIZE):
            chunk = ids[:, start:start + SEGMENT_SIZE]
            final.clear()
            _, state = model.step(chunk, torch.ones_like(chunk), state, logits="last")
            memory_out = final[-1][:, -NUM_MEM_TOKENS:]                     # [B, M, D]
            auxiliary.append(F.cross_entropy(head(memory_out).flatten(0, 1), keys.repeat_interleave(NUM_MEM_TOKENS)))
            logits, _ = model.step(question, ones, state, write=False, logits="last")
            losses.append(F.cross_entropy(logits, keys))
        task = losses[-1]  # the input as given: S segments, the question last
        optimise(model, optimiser, torch.stack(losses).mean() + aux_weight * torch.stack(auxiliary).mean())
        report(model, step, steps, task, accuracy, started, log)
    hook.remove()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=limits.argparse_type(limits.TRAINING_STEPS, "--steps"), default=2000)
    parser.add_argument("--seed", type=limits.argparse_type(limits.SEED, "--seed"), default=0)
    parser.add_argument("--max-segments", type=limits.argparse_type(limits.LENGTH_SEGMENTS, "--max-segments"),
                        default=16, help="longest training input, in segments")
    parser.add_argument("--out", type=Path, default=ARMT_OUT)
    parser.add_argument("--evaluate", action="store_true",
                        help="only measure <out>/model.pt against the RMT sample (no training)")
    parser.add_argument("--examples", type=limits.argparse_type(limits.EXAMPLES, "--examples"),
                        default=200, help="examples per length for --evaluate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.evaluate:
        started = time.perf_counter()
        model = train(args.steps, args.seed, max_segments=args.max_segments)
        path = save_checkpoint(model, args.out / "model.pt")
        save_tokenizer(args.out)
        print(f"trained in {time.perf_counter() - started:.0f}s; wrote {path} "
              f"({path.stat().st_size / 1e3:.0f} kB) and {args.out / 'tokenizer.json'}")
    evaluate(args.out / "model.pt", examples=args.examples)


if __name__ == "__main__":
    main()
