"""A byte-level tokenizer: token id = byte value (0..255). Self-contained, no downloads.

Written as a Hugging Face ``tokenizers`` tokenizer.json (a byte-level BPE with no merges)
so that bundles ship it and ``rmt-run --text`` reads text through it like any other.
"""
from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 256


def _byte_to_unicode() -> dict[int, str]:
    """The printable-character alias of every byte that byte-level BPE uses (GPT-2's table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer():
    """A ``tokenizers.Tokenizer`` mapping each byte to its own id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def save_tokenizer(directory: str | Path) -> Path:
    """Write tokenizer.json into ``directory`` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    build_tokenizer().save(str(path))
    return path
