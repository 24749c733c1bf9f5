"""Classify a long document with an encoder RMT bundle (by default the keyclass sample).

The reference encoder aligns segments to the end of the document, so the whole document is
tokenized first and run in one call; memory carries what the early segments said.

    .venv/bin/python samples/classify_document.py --file doc.txt
    .venv/bin/python samples/classify_document.py --bundle my-encoder-fp32 < doc.txt

Without --bundle it reads out/keyclass-fp32, exporting it from samples/keyclass/model.pt
(with the tokenizer beside it) the first time; that needs the export extra (torch). On a
machine with the runtime only, export it elsewhere and copy it over:

    rmt-export --ckpt samples/keyclass/model.pt --out out/keyclass-fp32
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from rmt_runtime import BundleError, RMTRuntime, RuntimeInputError, limits

CHECKPOINT = Path(__file__).resolve().parent / "keyclass" / "model.pt"
DEFAULT_BUNDLE = Path("out") / "keyclass-fp32"


def classify(runtime: RMTRuntime, tokenizer, text: str) -> tuple[str, np.ndarray]:
    """(label, class logits) of ``text``; labels from the bundle's id2label."""
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    logits = runtime.run(ids).last_logits[0]
    best = int(logits.argmax())
    return str(runtime.bundle.id2label.get(best, best)), logits


def export_command(bundle: Path) -> str:
    """The rmt-export command that creates ``bundle`` from the sample checkpoint."""
    checkpoint = os.path.relpath(CHECKPOINT) if CHECKPOINT.is_relative_to(Path.cwd()) else str(CHECKPOINT)
    return f"rmt-export --ckpt {checkpoint} --out {bundle}"


def export_sample(bundle: Path) -> None:
    """Export the keyclass sample to ``bundle``; exit with one line if this machine cannot."""
    try:
        from rmt_export.errors import ExportError
        from rmt_export.exporter import export_bundle
    except ImportError as exc:
        sys.exit(f"error: {bundle} does not exist, and exporting it here needs the export extra ({exc.name} is "
                 f'not installed: pip install "rmt-edge[export]"); create it with: {export_command(bundle)}')
    print(f"exporting {CHECKPOINT} to {bundle} (first run)", file=sys.stderr)
    try:
        export_bundle(CHECKPOINT, bundle, progress=lambda stage, detail: print(f"  [{stage}] {detail}",
                                                                                file=sys.stderr))
    except ExportError as exc:
        sys.exit(f"error: exporting {bundle} failed: {exc}")


def load(bundle: Path, default: bool):
    """(runtime, tokenizer) of an encoder bundle that ships tokenizer.json; one line and exit 1 if not."""
    if not bundle.exists():
        if not default:
            sys.exit(f"error: {bundle} does not exist; create the sample's bundle with: {export_command(bundle)}")
        export_sample(bundle)
    try:
        runtime = RMTRuntime.load(bundle)
    except BundleError as exc:
        sys.exit(f"error: {exc} (the sample's bundle: {export_command(bundle)} --force)")
    if runtime.kind != "encoder":
        sys.exit(f"error: {bundle} is a {runtime.kind} bundle; this sample needs an encoder (classifier)")
    if "tokenizer.json" not in runtime.bundle.tokenizer_files:
        sys.exit(f"error: {bundle} ships no tokenizer.json to read text with; re-export it with tokenizer.json "
                 "beside the checkpoint or rmt-export --tokenizer DIR")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit('error: reading text needs the tokenizers library: pip install "rmt-edge[text]"')
    try:  # a regular file of bounded size (rmt_runtime.limits), like every file rmt-edge reads
        return runtime, Tokenizer.from_str(limits.read_regular(bundle / "tokenizer.json", limits.TOKENIZER_BYTES,
                                                               "a tokenizer.json").decode("utf-8"))
    except (limits.LimitError, OSError, UnicodeDecodeError) as exc:
        sys.exit(f"error: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"encoder bundle [default: {DEFAULT_BUNDLE}, exported from the sample on first use]")
    parser.add_argument("--file", type=Path, default=None, help="document [default: stdin]")
    args = parser.parse_args()
    runtime, tokenizer = load(args.bundle or DEFAULT_BUNDLE, default=args.bundle is None)
    try:  # at most limits.INPUT_BYTES, from a file, a pipe or stdin
        text = limits.read_input(str(args.file) if args.file else "-", limits.INPUT_BYTES, "a document")[0].decode(
            "utf-8")
    except limits.LimitError as exc:
        sys.exit(f"error: {exc}")
    except (OSError, UnicodeDecodeError) as exc:
        sys.exit(f"error: cannot read {args.file or 'stdin'} as UTF-8 text ({exc})")
    try:
        label, logits = classify(runtime, tokenizer, text)
    except RuntimeInputError as exc:  # e.g. an empty document
        sys.exit(f"error: {exc}")
    print(f"{len(text)} characters -> class {label} (logit {logits.max():.2f})")


if __name__ == "__main__":
    main()
