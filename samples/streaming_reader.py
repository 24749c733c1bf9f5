"""A streaming long-document reader: feed text as it arrives, answer at the end.

The document never has to be in memory at once: each chunk is tokenized and fed; full
segments run as they fill; the runtime's state is a few KB whatever the length.

    .venv/bin/python samples/streaming_reader.py --bundle out/demo/keyrecall-fp32 --file doc.txt
    cat doc.txt | .venv/bin/python samples/streaming_reader.py --bundle out/demo/keyrecall-fp32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

from rmt_runtime import RMTRuntime, limits


def read_and_answer(runtime: RMTRuntime, tokenizer, chunks: Iterable[str]) -> tuple[str, int]:
    """Feed every text chunk, flush, and decode the most likely next token: (answer, tokens read)."""
    state = runtime.new_state()
    tokens = 0
    for chunk in chunks:
        ids = tokenizer.encode(chunk).ids
        runtime.feed(state, ids)
        tokens += len(ids)
    output = runtime.flush(state)
    return tokenizer.decode([int(output.last_logits[0].argmax())]), tokens


def text_chunks(stream, size: int = 4096) -> Iterable[str]:
    """Chunks of a text stream as they come (a file, a socket, stdin)."""
    while chunk := stream.read(size):
        yield chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--file", type=Path, default=None, help="document to read [default: stdin]")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(args.bundle)
    tokenizer = Tokenizer.from_str(  # a regular file of bounded size (rmt_runtime.limits)
        limits.read_regular(args.bundle / "tokenizer.json", limits.TOKENIZER_BYTES, "a tokenizer.json").decode("utf-8"))
    stream = open(args.file, encoding="utf-8") if args.file else sys.stdin
    with stream:
        answer, tokens = read_and_answer(runtime, tokenizer, text_chunks(stream))
    print(f"read {tokens} tokens; answer: {answer}")


if __name__ == "__main__":
    main()
