"""Checkpoint -> validated, self-describing bundle, written atomically.

Stages: load (checkpoint), trace (every graph of the step spec to ONNX), validate
(ONNX Runtime CPU vs PyTorch over many chained segments), save (memory_init.npy,
tokenizer files, manifest.json with hashes and the validation report). ``export_bundle``
ships the tokenizer found beside the checkpoint (or its backbone config) unless told
otherwise, so that a bundle reads text wherever it is copied. Everything is
written into a hidden sibling directory that is renamed into place only when complete,
so an interrupted or failed export leaves nothing that looks like a bundle.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_model import (CheckpointError, ConfigError, RMTBase, import_armt_checkpoint, import_reference_checkpoint,
                       load_checkpoint)
from rmt_model.armt import ARMTDecoder
from rmt_model.step import model_in_precision
from rmt_runtime.bundle import (MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, MEMORY_INIT_NAME, PRECISIONS, not_a_bundle,
                                write_manifest)
from rmt_runtime import limits
from rmt_runtime.owned_files import directory_reason, new_sibling_directory, remove_tree, replace_directory
from rmt_runtime.spec import SPEC_VERSION, step_specs

from .armt_graphs import armt_specs, export_armt_generation_graphs, export_armt_graph
from .errors import ExportError, ValidationError
from .graphs import DEFAULT_OPSET, SUPPORTED_OPSETS, export_generation_graphs, export_graph
from .memory import GiB, estimate_export_memory, memory_for_export
from .validate import ValidationPlan, validate_generation, validate_graphs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
# What the runtime reads text through (rmt-run --text, rmt-generate --prompt).
RUNTIME_TOKENIZER = "tokenizer.json"

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class ExportOptions:
    """How to export: precision, opset, validation, overwrite, tokenizer to ship.

    Tokenizer: ``tokenizer_dir`` when given; otherwise ``export_bundle`` ships the one
    ``find_tokenizer`` finds beside the checkpoint, unless ``ship_tokenizer`` is False.
    ``export_model`` has no checkpoint to look beside: it ships ``tokenizer_dir`` only.
    """

    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    validate: bool = True
    force: bool = False
    plan: ValidationPlan = field(default_factory=ValidationPlan)
    tokenizer_dir: Path | None = None
    ship_tokenizer: bool = True
    # Decoders: also the KV-cached prefill and decode graphs that generation runs.
    generation: bool = True
    # Refuse up front, with the estimate, an export that needs more memory than is available.
    check_memory: bool = True
    # Validate on this UTF-8 text, tokenized by the tokenizer the bundle ships, instead of
    # random ids (export_bundle; export_model takes ``plan.token_ids``).
    validation_text: Path | None = None
    # fp32 bundles: also validate the graphs as the openvino backend computes them in bf16
    # (report under validation["bf16"]); needs openvino and a CPU with bf16 instructions.
    bf16: bool = False

    def check(self) -> None:
        if self.bf16 and (self.precision != "fp32" or not self.validate):
            raise ExportError("bf16 is how the openvino backend computes an fp32 bundle: --bf16 validates that, so it "
                              f"needs an fp32 export with validation on (got precision {self.precision}"
                              f"{', validation off' if not self.validate else ''})")
        if self.bf16:
            from rmt_runtime.backends.openvino import check_precision_available
            from rmt_runtime.errors import BackendError

            try:
                check_precision_available("bf16")
            except BackendError as exc:
                raise ExportError(f"--bf16: {exc}") from None
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision {self.precision!r} is not supported (expected one of {PRECISIONS})")
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(f"opset {self.opset} is not supported: use {SUPPORTED_OPSETS.start}.."
                              f"{SUPPORTED_OPSETS.stop - 1} (dynamo writes invalid graphs below 18; "
                              "TensorRT 10 parses up to 20)")
        if self.tokenizer_dir is not None:
            if not self.ship_tokenizer:
                raise ExportError(f"a tokenizer directory ({self.tokenizer_dir}) was given and shipping a tokenizer "
                                  "was turned off (--tokenizer with --no-tokenizer): give one or the other")
            if not Path(self.tokenizer_dir).is_dir():
                raise ExportError(f"tokenizer directory {self.tokenizer_dir} does not exist")
            if not tokenizer_files(self.tokenizer_dir):
                raise ExportError(f"{self.tokenizer_dir} holds no tokenizer files (expected one of {TOKENIZER_FILES})")
        if self.validation_text is not None:
            if not self.validate:
                raise ExportError("validation text was given and validation was turned off (--validation-text with "
                                  "--no-validate): give one or the other")
            if not Path(self.validation_text).is_file():
                raise ExportError(f"validation text {self.validation_text} is not a file")


def tokenizer_files(directory: str | os.PathLike) -> list[str]:
    """The TOKENIZER_FILES that ``directory`` holds, in TOKENIZER_FILES order; one that is not a
    regular file, or larger than ``limits.TOKENIZER_BYTES``, is an ExportError (it would be copied)."""
    found = [name for name in TOKENIZER_FILES if (Path(directory) / name).exists()]
    for name in found:
        try:
            limits.check_regular(Path(directory) / name, limits.TOKENIZER_BYTES, "a tokenizer file")
        except limits.LimitError as exc:
            raise ExportError(f"tokenizer file {exc}") from None
    return found


def tokenizer_places(ckpt: str | os.PathLike, backbone_config: str | os.PathLike | None = None
                     ) -> list[tuple[Path, str]]:
    """Where ``find_tokenizer`` looks, in order, each with how the log names it: the
    checkpoint's folder (the checkpoint itself when it is a directory), then the folder of
    the backbone config."""
    ckpt = Path(ckpt)
    places = [(ckpt if ckpt.is_dir() else ckpt.parent, "beside the checkpoint")]
    if backbone_config is not None:
        folder = Path(backbone_config).parent
        if folder.resolve() != places[0][0].resolve():
            places.append((folder, "beside the backbone config"))
    return places


def find_tokenizer(ckpt: str | os.PathLike, backbone_config: str | os.PathLike | None = None
                   ) -> tuple[Path, str] | None:
    """(folder, where) of the tokenizer to ship by default, or None: the first place of
    ``tokenizer_places`` holding tokenizer.json (what the runtime reads), else the first
    holding any other TOKENIZER_FILES (shipped as they are, for the application's own use)."""
    places = tokenizer_places(ckpt, backbone_config)
    for folder, where in places:
        if (folder / RUNTIME_TOKENIZER).is_file():
            return folder, where
    for folder, where in places:
        if tokenizer_files(folder):
            return folder, where
    return None


def _choose_tokenizer(ckpt: str | os.PathLike, options: ExportOptions, reference: ReferenceLayout | None
                      ) -> tuple[Path | None, str]:
    """(the folder whose tokenizer files the bundle ships or None, the ``[tokenizer]`` log line)."""
    if not options.ship_tokenizer:
        return None, "none shipped (--no-tokenizer): the bundle takes token ids only"
    if options.tokenizer_dir is not None:
        folder, where = Path(options.tokenizer_dir), "given with --tokenizer"
    else:
        found = find_tokenizer(ckpt, reference.backbone_config if reference else None)
        if found is None:
            searched = " or ".join(f"{where} ({folder})"
                                   for folder, where in tokenizer_places(ckpt, reference.backbone_config
                                                                         if reference else None))
            return None, (f"none found {searched}: the bundle takes token ids only (--tokenizer DIR ships one, "
                          f"holding {RUNTIME_TOKENIZER})")
        folder, where = found
    names = tokenizer_files(folder)
    line = f"{', '.join(names)} from {folder} ({where})"
    if RUNTIME_TOKENIZER not in names:
        line += f"; no {RUNTIME_TOKENIZER}, which rmt-run --text and rmt-generate --prompt read"
    return folder, line


@dataclass(frozen=True)
class ReferenceLayout:
    """What a state dict of the reference RMT code needs besides its weights. With
    ``armt_version`` it is the reference ARMT code's (docs/ARMT.md): M is read off its tensors
    (``num_mem_tokens`` None), ``segment_size`` may come from an ARMT config.json, and
    ``lora_alpha`` merges LoRA adapters."""

    backbone_config: Path
    num_mem_tokens: int | None
    segment_size: int | None
    armt_version: str | None = None
    lora_alpha: float | None = None


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


def _producer() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("rmt-edge", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_destination(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse before any work: an existing --out without force, a file, a symlink, or a
    directory that is not verifiably an rmt-edge bundle (``--force`` replaces only what
    rmt-export wrote), or one that holds an input of this export (``inputs``)."""
    for parent in out.absolute().parents:  # a path under a regular file
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"--out {out}: {parent} is a file, not a directory (it cannot hold the bundle)")
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; give the bundle directory itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is an existing file; expected a directory path for the bundle")
    if not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            raise ExportError(f"--out {out} holds {source}, an input of this export; refusing to replace it "
                              "even with --force (write the bundle elsewhere)")
    reason = directory_reason(out, not_our_bundle)
    if reason:
        raise ExportError(f"--out {out} {reason}; --force replaces only a bundle that rmt-export wrote, so nothing "
                          "was deleted")


def not_our_bundle(directory: Path) -> str | None:
    """Why ``directory`` is not one rmt-export may replace (None: an empty folder, or a bundle
    whose manifest lists every file in it: ``not_a_bundle``)."""
    reason = not_a_bundle(directory) if any(directory.iterdir()) else None
    return f"is not an rmt-edge bundle ({reason})" if reason else None


def _bundle_path(out: str | os.PathLike) -> Path:
    """``out`` as given, or absolute where it has no name of its own ('.', '..'): the bundle is
    staged and replaced beside it, under its name."""
    out = Path(out)
    return out.resolve() if out.name in ("", ".", "..") else out


def load_model(ckpt: str | os.PathLike, reference: ReferenceLayout | None = None,
               note: Callable[[str], None] | None = None) -> RMTBase | ARMTDecoder:
    """The model to export: an rmt-edge checkpoint, or a reference state dict (a file or a
    directory of any published layout) + its layout. ``note`` hears what was read and converted."""
    try:
        if reference is None:
            if Path(ckpt).is_dir():
                raise CheckpointError(f"{ckpt}: a directory holds a checkpoint of the reference RMT code "
                                      "(safetensors, shards or pytorch_model.bin), which needs its layout")
            return load_checkpoint(ckpt)
        if reference.armt_version is not None:
            return import_armt_checkpoint(ckpt, reference.backbone_config, segment_size=reference.segment_size,
                                          version=reference.armt_version, lora_alpha=reference.lora_alpha, note=note)
        return import_reference_checkpoint(ckpt, reference.backbone_config,
                                           num_mem_tokens=reference.num_mem_tokens,
                                           segment_size=reference.segment_size, note=note)
    except CheckpointError as exc:
        message = str(exc)
        if "reference RMT code" in message:
            message += " (rmt-export: pass --backbone-config, --num-mem-tokens and --segment-size)"
        elif "reference ARMT code" in message:
            message += (" (rmt-export: pass --backbone-config and --armt-version, with --segment-size unless an ARMT "
                        "config.json gives it; see docs/ARMT.md)")
        raise ExportError(message) from None
    except ConfigError as exc:
        raise ExportError(f"{ckpt}: {exc}") from None


def export_bundle(ckpt: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                  reference: ReferenceLayout | None = None, progress: Progress | None = None) -> ExportResult:
    """Load ``ckpt`` and export it to the bundle directory ``out`` (see ``export_model``)."""
    options.check()
    out = _bundle_path(out)
    tokenizer_dir, tokenizer_line = _choose_tokenizer(ckpt, options, reference)
    options = replace(options, tokenizer_dir=tokenizer_dir)
    if options.validation_text is not None:
        options = replace(options, plan=_plan_on_text(options.plan, options.validation_text, tokenizer_dir))
    inputs = tuple(Path(p) for p in (ckpt, tokenizer_dir,
                                     reference.backbone_config if reference else None) if p is not None)
    check_destination(out, options.force, inputs)
    if not Path(ckpt).exists():
        raise ExportError(f"--ckpt {ckpt}: no such file or directory")
    started = time.perf_counter()
    model = load_model(ckpt, reference, (lambda detail: progress("read", detail)) if progress else None)
    seconds = {"load": time.perf_counter() - started}
    if progress:
        what = "ARMT" if isinstance(model, ARMTDecoder) else f"{model.config.kind} RMT"
        progress("load", f"{model.config.family} {what}, M={model.config.num_mem_tokens}, "
                         f"segment {model.config.segment_size} ({seconds['load']:.1f}s)")
        progress("tokenizer", tokenizer_line)
    result = export_model(model, out, options, progress)
    result.seconds = {**seconds, **result.seconds}
    return result


def bundle_kind(model: RMTBase | ARMTDecoder) -> str:
    """The manifest's kind: what the runtime does with the bundle (an ARMT runs as a decoder)."""
    return "decoder" if isinstance(model, ARMTDecoder) else model.config.kind


def _plan_on_text(plan: ValidationPlan, text_path: Path, tokenizer_dir: Path | None) -> ValidationPlan:
    """``plan`` validating on ``text_path``'s tokens, read with the tokenizer the bundle ships."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / RUNTIME_TOKENIZER).is_file():
        raise ExportError(f"--validation-text {text_path} needs the bundle's {RUNTIME_TOKENIZER} to read it (none "
                          "ships: give --tokenizer DIR)")
    try:  # bounded, and a regular file (rmt_runtime.limits): a FIFO or /dev/zero is refused unread
        text = limits.read_regular(text_path, limits.INPUT_BYTES, "a validation text").decode("utf-8")
        tokenizer = limits.read_regular(Path(tokenizer_dir) / RUNTIME_TOKENIZER, limits.TOKENIZER_BYTES,
                                        "a tokenizer.json").decode("utf-8")
    except limits.LimitError as exc:
        raise ExportError(f"--validation-text: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--validation-text {text_path}: not readable UTF-8 text ({exc})") from None
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_str(tokenizer).encode(text).ids, np.int64)
    return replace(plan, token_ids=ids, source=f"text {Path(text_path).name} ({len(ids)} tokens)")


def _check_memory(model: RMTBase | ARMTDecoder, options: ExportOptions, progress: Progress | None) -> None:
    """Say what the export will need; refuse it before any work when the machine has less."""
    config = model.config
    need = estimate_export_memory(sum(p.numel() for p in model.parameters()), options.precision, bundle_kind(model),
                                  options.plan.batch, config.segment_size, config.vocab_size, options.validate)
    have = memory_for_export()
    if progress:
        progress("memory", f"peak estimated at {need.total / GiB:.1f} GiB ({need.describe()})"
                           + ("" if have is None else f"; {have / GiB:.1f} GiB available"))
    if options.check_memory and have is not None and need.total > have:
        lighter = (" (or with --no-validate, which opens no ONNX Runtime session and needs no validation logits)"
                   if need.peak_stage == "validate" else "")
        raise ExportError(f"this export needs about {need.total / GiB:.1f} GiB of memory ({need.describe()} GiB) "
                          f"and {have / GiB:.1f} GiB is available: export on a machine with more memory{lighter}, "
                          "or pass --no-memory-check to try anyway")


def export_model(model: RMTBase | ARMTDecoder, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None) -> ExportResult:
    """Trace, validate and write the bundle for ``model``; atomic: all of it or nothing."""
    options.check()
    out = _bundle_path(out)
    check_destination(out, options.force, (options.tokenizer_dir,) if options.tokenizer_dir else ())
    config = model.config
    try:  # the user's validation tokens fit this model, before any work
        options.plan.check_tokens(config.vocab_size, config.segment_size)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    _check_memory(model, options, progress)
    model = model.eval()
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = new_sibling_directory(out, "partial")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is shared like any directory
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write into {parent} ({exc.strerror})") from None
    seconds: dict[str, float] = {}
    armt = isinstance(model, ARMTDecoder)
    kind = bundle_kind(model)
    try:
        if armt:
            specs = armt_specs(model)
        else:
            specs = step_specs(config.kind, config.num_mem_tokens, config.hidden_size, config.vocab_size,
                               config.num_labels if config.kind == "encoder" else None)
        metadata = {f"rmt.{k}": str(v) for k, v in dict(
            kind=kind, family=config.family, num_mem_tokens=config.num_mem_tokens,
            segment_size=config.segment_size, hidden_size=config.hidden_size,
            vocab_size=config.vocab_size, precision=options.precision).items()}
        if armt:
            metadata["rmt.architecture"] = "armt"
        started = time.perf_counter()
        traced = model_in_precision(model, options.precision)
        graphs = {}
        for name, spec in specs.items():
            path = staging / f"{name}.onnx"
            if armt:
                export_armt_graph(traced, spec, options.precision, path, options.opset, metadata)
            else:
                export_graph(traced, spec, options.precision, options.opset, path, metadata)
            graphs[name] = (path, spec)
        generation = {}
        if options.generation and kind == "decoder":
            export_generation = export_armt_generation_graphs if armt else export_generation_graphs
            generation = export_generation(traced, options.precision, options.opset, staging, metadata)
        del traced
        seconds["trace"] = time.perf_counter() - started
        if progress:
            progress("trace", f"{', '.join(f'{n}.onnx' for n in [*graphs, *generation])} ({seconds['trace']:.1f}s)")

        report = None
        if options.validate:
            started = time.perf_counter()
            report = validate_graphs(model, graphs, options.precision, options.plan)
            if generation:
                report["generation"] = validate_generation(model, generation, options.precision, options.plan)
            if options.bf16:  # the same graphs, computed by OpenVINO in bf16
                try:
                    report["bf16"] = validate_graphs(model, graphs, "bf16", options.plan)
                    if generation:
                        report["bf16"]["generation"] = validate_generation(model, generation, "bf16", options.plan)
                except ValidationError as exc:
                    raise ValidationError([f"computed in bf16 by OpenVINO (--bf16): {miss}" for miss in exc.misses],
                                          exc.report) from None
            seconds["validate"] = time.perf_counter() - started
            if progress:
                progress("validate", f"{options.plan.segments} chained segments, batch {options.plan.batch}: "
                                     f"passed ({seconds['validate']:.1f}s)")

        started = time.perf_counter()
        files = []
        if not armt:  # an ARMT's state starts at zero: the runtime makes it from the spec
            np.save(staging / MEMORY_INIT_NAME, model.initial_memory(1)[0].detach().float().numpy())
            files.append(MEMORY_INIT_NAME)
        graphs.update(generation)
        for name, (path, _) in graphs.items():
            files.append(path.name)
            if (staging / f"{path.name}.data").exists():
                files.append(f"{path.name}.data")
        tokenizer = None
        if options.tokenizer_dir is not None:
            tokenizer = tokenizer_files(options.tokenizer_dir)
            for name in tokenizer:
                shutil.copyfile(Path(options.tokenizer_dir) / name, staging / name)
            files += tokenizer
        manifest: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA_VERSION, "spec_version": SPEC_VERSION,
            "kind": kind, "family": config.family, "num_mem_tokens": config.num_mem_tokens,
            "segment_size": config.segment_size, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "precision": options.precision, "opset": options.opset,
            "graphs": {name: {"file": path.name, "spec": spec.to_dict()} for name, (path, spec) in graphs.items()},
            "files": {name: "" for name in files},
            "producer": _producer(), "validation": report, "tokenizer": tokenizer,
            "max_positions": config.max_positions, "rmt_config": config.to_dict(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if armt:
            manifest["architecture"] = "armt"
        else:
            manifest["memory_init"] = MEMORY_INIT_NAME
        if config.kind == "encoder":
            manifest["num_labels"] = config.num_labels
            manifest["encoder_ids"] = {"cls": config.cls_token_id, "sep": config.sep_token_id,
                                       "pad": config.pad_token_id}
        for path in staging.iterdir():
            _fsync(path)
        write_manifest(staging, manifest)
        replace_directory(staging, out, not_our_bundle, ExportError)  # checked again: it may have changed
        seconds["save"] = time.perf_counter() - started
        if progress:
            size = sum(p.stat().st_size for p in out.iterdir())
            progress("save", f"{out} ({size / 1e6:.1f} MB, {len(files) + 1} files) ({seconds['save']:.1f}s)")
        manifest = _read_manifest(out)
        return ExportResult(path=out, manifest=manifest, seconds=seconds)
    except BaseException:
        remove_tree(staging)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _read_manifest(out: Path) -> dict[str, Any]:
    import json

    return json.loads((out / MANIFEST_NAME).read_text())


__all__ = ["ExportOptions", "ReferenceLayout", "ExportResult", "export_bundle", "export_model",
           "load_model", "check_destination", "find_tokenizer", "tokenizer_files", "ExportError", "ValidationError"]
