"""Classify a long document with an encoder RMT bundle (e.g. the keyclass sample).

The reference encoder aligns segments to the end of the document, so the whole document is
tokenized first and run in one call; memory carries what the early segments said.

    .venv/bin/python samples/classify_document.py --bundle out/keyclass-fp32 --file doc.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rmt_runtime import RMTRuntime


def classify(runtime: RMTRuntime, tokenizer, text: str) -> tuple[str, np.ndarray]:
    """(label, class logits) of ``text``; labels from the bundle's id2label."""
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    logits = runtime.run(ids).last_logits[0]
    id2label = runtime.bundle.manifest["rmt_config"]["backbone"].get("id2label") or {}
    best = int(logits.argmax())
    return str(id2label.get(str(best), best)), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--file", type=Path, default=None, help="document [default: stdin]")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(args.bundle)
    if runtime.kind != "encoder":
        sys.exit(f"{args.bundle} is a {runtime.kind} bundle; this sample needs an encoder (classifier)")
    tokenizer = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    text = args.file.read_text(encoding="utf-8") if args.file else sys.stdin.read()
    label, logits = classify(runtime, tokenizer, text)
    print(f"{len(text)} characters -> class {label} (logit {logits.max():.2f})")


if __name__ == "__main__":
    main()
