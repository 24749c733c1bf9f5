"""Every code block of README.md and docs/*.md runs as written.

Sybil (docs/TESTING.md says why this tool) finds the fenced blocks and the
``<!-- skip: next "reason" -->`` directives. ``python`` blocks run in one namespace per
document; ``sh`` blocks run in bash (-e, -o pipefail), one block after the other, in the
document's own work directory, where the files the docs name exist (DOC_FILES: the one
documented placeholder is ``model.pt``, the shipped sample). ``text`` blocks are not code
(diagrams, usage synopses, printed output). A block that needs a GPU, a network or minutes
is skipped with its reason, but the flags of its rmt-* commands are still checked against
that command's ``--help``, so a renamed flag fails here even in a block that cannot run.
The run ends with a count per document: blocks run, blocks skipped and why (printed by
tests/conftest.py).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import SkipTest

import numpy as np
import pytest
from sybil import Sybil
from sybil.example import NotEvaluated
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

from rmt_export.triton_server import server_venv

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh", "python", "text"}
COMMANDS = {"rmt-export", "rmt-check-trt", "rmt-triton", "rmt-build", "rmt-run", "rmt-generate", "rmt-bench"}
EXPORT_THE_SAMPLE = {"README.md", "EXPORT.md"}  # these make model-fp32/ themselves
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "samples" / "keyrecall"
TEXT = ("The key is 7. " + "Noise follows the key, segment after segment, and the model has to carry it. " * 20
        + "What was the key?")


def _check_flags(source: str) -> None:
    """Every --flag given to an rmt-* command or to a Python script of this repository is one
    that its --help lists."""
    for line in source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for index, word in enumerate(words):
            if Path(word).name in COMMANDS:
                command = [str(BIN / Path(word).name)]
            elif word.endswith(".py") and (ROOT / word).is_file() and index and "python" in words[index - 1]:
                command = [sys.executable, str(ROOT / word)]
            else:
                continue
            flags = {w.split("=")[0] for w in words[index + 1:] if w.startswith("--")}
            listed = _help(command)
            unknown = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", listed))
            assert not unknown, f"{word} has no option {', '.join(unknown)} (its --help: {listed[:2000]})"
            break


_HELP: dict[tuple[str, ...], str] = {}


def _help(command: list[str]) -> str:
    key = tuple(command)
    if key not in _HELP:
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, f"{' '.join(command)} --help failed: {done.stderr}"
        _HELP[key] = done.stdout
    return _HELP[key]


class ShellBlock:
    """Evaluates a ``sh`` block in bash in the document's work directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def __call__(self, example) -> None:
        source = str(example.parsed)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", source], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise AssertionError(f"exit {done.returncode}\n--- block ---\n{source}--- stdout ---\n"
                                 f"{done.stdout[-3000:]}--- stderr ---\n{done.stderr[-3000:]}")


def _fenced_languages(path: Path) -> list[tuple[int, str]]:
    """(line, language) of every fenced block; indented code blocks are refused (they cannot
    carry a language, so they would escape this test)."""
    found, fenced, previous = [], False, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if not fenced:
                found.append((number, line[3:].strip()))
            fenced = not fenced
        elif not fenced and line.startswith("    ") and not previous.strip() and line.strip():
            found.append((number, "(indented)"))
        previous = line if not fenced else "```"
    return found


def _make_files(workdir: Path) -> None:
    """The files the documents name, made here so their commands run as written."""
    for name in ("model.pt", "tokenizer.json"):  # the sample, with the tokenizer beside it
        shutil.copyfile(SAMPLE / name, workdir / name)
    rng = np.random.default_rng(0)
    np.save(workdir / "ids.npy", rng.integers(0, 256, 100))
    np.save(workdir / "prompt.npy", rng.integers(0, 256, 40))
    (workdir / "book.txt").write_text(TEXT)
    (workdir / "document.txt").write_text(TEXT)
    (workdir / "part1.txt").write_text(" ".join(map(str, rng.integers(0, 256, 50))))
    (workdir / "part2.txt").write_text(" ".join(map(str, rng.integers(0, 256, 50))))
    batch = rng.integers(0, 256, (3, 40))
    mask = np.ones_like(batch)
    mask[1, 30:] = 0
    mask[2, 12:] = 0
    np.save(workdir / "batch.npy", batch)
    np.save(workdir / "mask.npy", mask)
    for name in (".venv", "samples", "benchmarks", "scripts"):  # repository-relative commands
        (workdir / name).symlink_to(Path(sys.prefix) if name == ".venv" else ROOT / name)
    # The Triton server's environment (docs/SCALING.md): the one the tests use.
    (workdir / ".venv-triton").symlink_to(server_venv() or ROOT / ".venv-triton")


def _reference_checkpoint(workdir: Path) -> None:
    """rmt-gpt2/ and gpt2/config.json: a tiny GPT-2 RMT in the reference code's layout
    (memory_cell.* keys, model.safetensors), for the documented import command."""
    import json

    import torch
    from safetensors.torch import save_file

    from rmt_model import build_model
    from rmt_model.tiny import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=16, segment_size=512, n_positions=1024))
    tensors = {("memory_cell.memory" if k == "memory" else "memory_cell." + k): v.contiguous().clone()
               for k, v in model.state_dict().items() if not k.endswith("lm_head.weight")}
    (workdir / "rmt-gpt2").mkdir()
    save_file(tensors, workdir / "rmt-gpt2" / "model.safetensors")
    (workdir / "gpt2").mkdir()
    (workdir / "gpt2" / "config.json").write_text(json.dumps(model.config.backbone))


def _export_sample(out: Path) -> None:
    done = subprocess.run([str(BIN / "rmt-export"), "--ckpt", str(SAMPLE / "model.pt"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr


def _outcome(example) -> tuple[str, str]:
    """Evaluate one example: ("run", "") or ("skipped", reason); failures raise."""
    try:
        example.evaluate()
    except SkipTest as skipped:
        if example.region.lexemes.get("arguments") == "sh":
            _check_flags(str(example.parsed))
        return "skipped", str(skipped)
    except NotEvaluated:
        return "skipped", "not evaluated"
    return "run", ""


@pytest.mark.parametrize("document", DOCUMENTS, ids=[p.relative_to(ROOT).as_posix() for p in DOCUMENTS])
def test_every_code_block_runs_as_written(document, tmp_path, monkeypatch, record_property, shared_once):
    blocks = _fenced_languages(document)
    unknown = [(line, language) for line, language in blocks if language not in LANGUAGES]
    assert not unknown, f"{document.name}: blocks at lines {unknown}: give each fenced block one of {LANGUAGES}"
    _make_files(tmp_path)
    text = document.read_text()
    if "rmt-gpt2/" in text:
        _reference_checkpoint(tmp_path)
    if "model-fp32" in text and document.name not in EXPORT_THE_SAMPLE:
        # A document that runs the README's bundle without exporting it: the README's export
        # of the sample, made once per test run.
        (tmp_path / "model-fp32").symlink_to(shared_once("docs/model-fp32", _export_sample))
    monkeypatch.chdir(tmp_path)
    sybil = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("sh", ShellBlock(tmp_path)), SkipParser()])
    outcomes = []
    for example in sybil.parse(document):
        if example.region.lexemes.get("arguments") not in ("sh", "python"):
            example.evaluate()  # a skip directive
            continue
        started = time.perf_counter()
        try:
            status, reason = _outcome(example)
        except Exception as failure:
            raise AssertionError(f"{document.relative_to(ROOT)}:{example.line}: {failure}") from None
        outcomes.append((example.line, status, reason, round(time.perf_counter() - started, 1)))
    code = sum(1 for _, language in blocks if language in ("sh", "python"))
    assert len(outcomes) == code, f"{document.name}: {code} code blocks, {len(outcomes)} evaluated"
    record_property("doc_blocks", outcomes)


def test_the_flag_check_knows_every_command_the_package_installs():
    """COMMANDS is what _check_flags checks: a new console script must be added there."""
    setup = (ROOT / "setup.py").read_text()
    assert set(re.findall(r'"(rmt-[a-z-]+)=', setup)) == COMMANDS


def test_the_flag_check_catches_an_unknown_flag_in_a_skipped_block():
    with pytest.raises(AssertionError, match="rmt-run has no option --no-such-flag"):
        _check_flags("rmt-run --bundle b --no-such-flag 1   # a comment --ignored")
    with pytest.raises(AssertionError, match="has no option --no-such-flag"):
        _check_flags(".venv/bin/python benchmarks/real_scale.py \\\n    --shape gpt2-small --no-such-flag")
    _check_flags("rmt-run --bundle b --ids x.npy --json   # --not-a-flag in a comment")
