"""``rmt-export``: a thin click layer over ``rmt_export.exporter.export_bundle``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rmt_runtime import limits
from rmt_runtime.bundle import Bundle, BundleError
from rmt_runtime.errors import EngineError
from rmt_runtime.cli_support import JsonCommand, fail, raise_if_interrupted, run_guarded, terminate_as_interrupt

from .errors import ExportError


# What rmt_export imports, at once or during an export: the ``export`` extra of setup.py.
EXPORT_STACK = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "safetensors")
EXPORT_INSTALL = 'pip install "rmt-edge[export]"'


def require_export_stack(as_json: bool) -> None:
    """Fail with one line naming the extra when a module of the export stack is not installed
    (a machine with the runtime only), before any import of it can end in a traceback."""
    import importlib
    import importlib.util

    missing = []
    for name in EXPORT_STACK:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses it; a module with no __spec__
            found = False
        if not found:
            missing.append(name)
    if missing:
        fail(f"rmt-export needs the export extra, and {', '.join(missing)} "
             f"{'is' if len(missing) == 1 else 'are'} not installed here: {EXPORT_INSTALL}", as_json)
    try:  # all found, yet one may be broken (a partial install): its import says why
        importlib.import_module(".exporter", __package__)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in EXPORT_STACK:
            raise
        fail(f"rmt-export needs the export extra, and importing it failed ({exc}): {EXPORT_INSTALL}", as_json)


def _run_guarded(verbose: bool, as_json: bool, work, interrupted=lambda: "interrupted: nothing was written"):
    return run_guarded(verbose, as_json, work, (ExportError, BundleError, EngineError), interrupted)


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True, type=click.Path(exists=True, path_type=Path),
              help="rmt-edge checkpoint (model.pt), or a reference RMT checkpoint with --backbone-config: a "
                   "torch state dict (.bin/.pt), model.safetensors, a model.safetensors.index.json with its "
                   "shards, or a directory holding one of these.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle directory to write [default: <ckpt name>-<precision> beside the checkpoint].")
@click.option("--fp16", is_flag=True, help="fp16 weights and compute inside the graphs; memory I/O stays float32.")
@click.option("--int8", is_flag=True, help="int8 MatMul weights (ONNX Runtime dynamic quantization) for CPUs and "
                                           "edge boards; not for TensorRT.")
@click.option("--bf16", is_flag=True,
              help="fp32 bundles: also validate the graphs as the openvino backend computes them in bf16 (rmt-run "
                   "--backend openvino --precision bf16); needs openvino and a CPU with AVX-512 BF16 or AMX.")
@click.option("--opset", type=limits.option_type(limits.OPSET), default=18, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch validation (not recommended).")
@click.option("--segments", type=limits.option_type(limits.VALIDATION_SEGMENTS), default=32, show_default=True,
              help="Chained segments the validation runs.")
@click.option("--validation-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Validate on this UTF-8 text (read by the bundle's tokenizer) instead of random token ids: a "
                   "trained model's own kind of data, where random ids can drive it out of the range its fp16 graph "
                   "holds (docs/VALIDATION.md).")
@click.option("--no-generation", is_flag=True,
              help="Decoders: leave out the prefill/decode graphs that rmt-generate needs (smaller bundle).")
@click.option("--engine", is_flag=True,
              help="Then build TensorRT engines for this machine into <bundle>/engines (as rmt-build).")
@click.option("--engine-builder", type=click.Choice(["tensorrt", "tensorrt_rtx"]), default="tensorrt",
              show_default=True, help="--engine: the builder module.")
@click.option("--max-batch", type=limits.option_type(limits.MAX_BATCH), default=8, show_default=True,
              help="--engine: largest batch of the optimisation profile.")
@click.option("--workspace", "workspace_mb", type=limits.option_type(limits.WORKSPACE_MB), default=1024,
              show_default=True, help="--engine: builder workspace cap in MB (keep it small on 8 GB Jetson boards).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Directory of tokenizer files to ship in the bundle [default: the tokenizer files "
                                 "beside the checkpoint, else beside --backbone-config].")
@click.option("--no-tokenizer", is_flag=True, help="Ship no tokenizer (the bundle then takes token ids only).")
@click.option("--backbone-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reference checkpoints: the backbone's config.json (e.g. GPT-2's).")
@click.option("--num-mem-tokens", type=limits.option_type(limits.NUM_MEM_TOKENS), default=None,
              help="Reference checkpoints: M.")
@click.option("--segment-size", type=limits.option_type(limits.SEGMENT_SIZE), default=None,
              help="Reference checkpoints: tokens per segment.")
@click.option("--armt-version", type=click.Choice(["normalized", "unnormalized"]), default=None,
              help="Reference ARMT checkpoints (with --backbone-config: the base model's or the ARMT's config.json): "
                   "the authors' code revision that trained it, normalized (experimental branch from 2024-08-28, "
                   "the Hugging Face packaging) or unnormalized (default branch); see docs/ARMT.md.")
@click.option("--lora-alpha", type=limits.option_type(limits.LORA_ALPHA), default=None,
              help="Reference ARMT checkpoints with LoRA adapters: lora_alpha from the adapter's config (merged as "
                   "alpha / r).")
@click.option("--no-memory-check", is_flag=True,
              help="Export even when the memory estimate is above what the machine has available.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(ckpt, out, fp16, int8, bf16, opset, force, no_validate, segments, validation_text, no_generation, engine,
         engine_builder, max_batch, workspace_mb, tokenizer_dir, no_tokenizer, backbone_config, num_mem_tokens,
         segment_size, armt_version, lora_alpha, no_memory_check, as_json, verbose):
    """Export an RMT checkpoint to a validated bundle holding single-segment ONNX graphs.

    \b
    Examples:
      rmt-export --ckpt model.pt
      rmt-export --ckpt model.pt --fp16 --out bundles/model-fp16 --force
      rmt-export --ckpt model.pt --fp16 --engine        # on the GPU/Jetson: export, then build engines
      rmt-export --ckpt model.pt --int8                 # CPUs: int8 MatMul weights, validated like the others
      rmt-export --ckpt model.pt --bf16                 # fp32, also validated as computed in bf16 (OpenVINO)
      rmt-export --ckpt rmt_gpt2.bin --backbone-config gpt2/config.json \\
                 --num-mem-tokens 16 --segment-size 512
      rmt-export --ckpt rmt-gpt2-hub/ --backbone-config gpt2/config.json \\
                 --num-mem-tokens 16 --segment-size 512   # model.safetensors or shards
      rmt-export --ckpt armt.pt                         # an ARMT checkpoint of rmt-edge
      rmt-export --ckpt armt-babilong/ --backbone-config gpt2/config.json \\
                 --armt-version normalized --segment-size 1024   # the ARMT authors' weights

    The bundle holds step.onnx (ids + memory -> logits + new memory), ingest.onnx (the
    same without per-token logits), for decoders prefill.onnx and decode.onnx (KV-cached
    generation), memory_init.npy and manifest.json (geometry, I/O spec, hashes, and the
    validation report). Validation runs ONNX Runtime CPU against
    PyTorch over chained segments and fails the export on any miss. The tokenizer found
    beside the checkpoint (tokenizer.json and the other Hugging Face tokenizer files) ships
    too, so that rmt-run --text and rmt-generate --prompt read text: --tokenizer DIR picks
    another, --no-tokenizer none.
    """
    if fp16 and int8:
        fail("give --fp16 or --int8, not both", as_json)
    if tokenizer_dir is not None and no_tokenizer:
        fail("give --tokenizer DIR or --no-tokenizer, not both", as_json)
    require_export_stack(as_json)
    from .exporter import ExportOptions, ReferenceLayout, export_bundle
    from .validate import ValidationPlan, summary_lines

    terminate_as_interrupt()  # SIGTERM cleans up the partial bundle like Ctrl-C does
    if engine and int8:
        fail("--engine builds TensorRT engines, which int8 (ONNX Runtime quantized) bundles cannot have: "
             "export --fp16 or fp32 for TensorRT", as_json)
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    if armt_version is not None or lora_alpha is not None:
        if armt_version is None or backbone_config is None or num_mem_tokens is not None:
            fail("reference ARMT checkpoints take --armt-version with --backbone-config (and --segment-size unless "
                 "an ARMT config.json gives it, --lora-alpha for LoRA adapters); not --num-mem-tokens, which is "
                 "read off the checkpoint's memory", as_json)
        reference = ReferenceLayout(backbone_config, None, segment_size, armt_version, lora_alpha)
    else:
        layout_given = [backbone_config is not None, num_mem_tokens is not None, segment_size is not None]
        if any(layout_given) and not all(layout_given):
            fail("--backbone-config, --num-mem-tokens and --segment-size go together (reference checkpoints; "
                 "reference ARMT checkpoints: --backbone-config with --armt-version)", as_json)
        reference = ReferenceLayout(backbone_config, num_mem_tokens, segment_size) if all(layout_given) else None
    if out is None:
        out = ckpt.with_name(f"{ckpt.stem}-{precision}")
    options = ExportOptions(precision=precision, opset=opset, validate=not no_validate, force=force,
                            plan=ValidationPlan(segments=segments), tokenizer_dir=tokenizer_dir,
                            ship_tokenizer=not no_tokenizer, generation=not no_generation,
                            check_memory=not no_memory_check, validation_text=validation_text, bf16=bf16)

    def progress(stage: str, detail: str) -> None:
        click.echo(f"[{stage}] {detail}", err=True)
        if stage != "save":  # after save the bundle is complete and in place
            raise_if_interrupted()

    from rmt_runtime.engines import BuildOptions, build_bundle_engines

    if engine:  # a builder that is not here fails before minutes of export, not after
        from rmt_runtime.engines import import_builder

        _run_guarded(verbose, as_json, lambda: import_builder(engine_builder))
    result = _run_guarded(verbose, as_json, lambda: export_bundle(ckpt, out, options, reference, progress))
    engines = None
    if engine:
        def build():
            say = (lambda message: None) if as_json else (lambda message: click.echo(f"[engine] {message}", err=True))
            try:
                return build_bundle_engines(result.path, BuildOptions(builder=engine_builder, max_batch=max_batch,
                                                                      workspace_mb=workspace_mb), say)
            except EngineError as exc:
                raise ExportError(f"the bundle {result.path} is written and validated, but building its "
                                  f"engines failed: {exc}") from None

        engines = _run_guarded(verbose, as_json, build,
                               lambda: f"interrupted while building engines: the bundle {result.path} is complete; "
                                       "rmt-build builds its engines")
    written = Bundle(path=result.path, manifest=result.manifest)  # the manifest, read through its schema
    report = written.validation or None
    if as_json:
        click.echo(json.dumps({
            "ok": True, "bundle": str(result.path), "precision": precision, "seconds": result.seconds,
            "files": written.file_hashes, "tokenizer": written.tokenizer_files or None,
            "validated": report is not None, "engines": engines,
            "validation": None if report is None else {
                name: {"worst": g["worst"], "argmax_agreement": g.get("argmax_agreement")}
                for name, g in report["graphs"].items()},
            "validation_bf16": None if report is None or "bf16" not in report else {
                name: {"worst": g["worst"], "argmax_agreement": g.get("argmax_agreement")}
                for name, g in report["bf16"]["graphs"].items()},
        }, indent=2))
        return
    if report is not None:
        for line in summary_lines(report):
            click.echo(f"  {line}", err=True)
        if "bf16" in report:
            click.echo("  computed in bf16 by OpenVINO (--bf16):", err=True)
            for line in summary_lines(report["bf16"]):
                click.echo(f"    {line}", err=True)
    else:
        click.echo("  validation skipped (--no-validate)", err=True)
    click.echo(str(result.path))


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory.")
@click.option("--max-batch", type=limits.option_type(limits.MAX_BATCH), default=8, show_default=True,
              help="Largest batch of the optimisation profile.")
@click.option("--workspace", "workspace_mb", type=limits.option_type(limits.WORKSPACE_MB), default=1024,
              show_default=True,
              help="Builder workspace limit in MB.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def check_trt_main(bundle_dir, max_batch, workspace_mb, as_json, verbose):
    """Parse and build every graph of a bundle with TensorRT-RTX's builder, on the CPU.

    \b
    Example:
      rmt-check-trt --bundle model-fp16

    A gate for CI machines without a GPU (pip install tensorrt-rtx-cu12): it lists every
    node TensorRT cannot take and fails (exit 1) unless every graph builds. RTX engines
    target RTX GPUs, not Jetson: deployment engines are built on the target (rmt-build).
    """
    from dataclasses import asdict

    from . import trt_gate

    def work():
        try:
            return trt_gate.check_bundle(bundle_dir, max_batch=max_batch, workspace_mb=workspace_mb)
        except RuntimeError as exc:  # tensorrt_rtx is missing
            raise ExportError(str(exc)) from None

    results = _run_guarded(verbose, as_json, work)
    ok = all(r.ok for r in results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "graphs": [dict(asdict(r), ok=r.ok) for r in results]}, indent=2))
    else:
        for result in results:
            click.echo(result.summary())
    if not ok:
        raise SystemExit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory.")
@click.option("--repo", "repository", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Triton model repository to write into.")
@click.option("--kind", "repository_kind", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
              show_default=True,
              help="onnxruntime: Triton's ONNX Runtime backend, implicit state, whole segments (GPU deployment). "
                   "python: Triton's Python backend running rmt_runtime, chunks of any length (CPU nodes).")
@click.option("--name", default="rmt", show_default=True, help="Model name in the repository.")
@click.option("--graph", type=click.Choice(["ingest", "step"]), default="ingest", show_default=True,
              help="onnxruntime kind: ingest: last-token logits per request; step: logits for every position.")
@click.option("--max-batch", type=limits.option_type(limits.MAX_BATCH), default=8, show_default=True,
              help="Sequences batched into one step by the sequence batcher.")
@click.option("--max-sequences", type=limits.option_type(limits.MAX_SEQUENCES), default=None,
              help="Live sequences per instance (max_candidate_sequences) [default: 4 x --max-batch]; more wait "
                   "in Triton's backlog until one ends.")
@click.option("--idle-seconds", type=limits.option_type(limits.IDLE_SECONDS), default=60.0, show_default=True,
              help="A sequence without a request for this long is dropped with its memory.")
@click.option("--queue-delay-us", type=limits.option_type(limits.QUEUE_DELAY_US), default=1000, show_default=True,
              help="How long the batcher waits to fill a batch (microseconds): latency at low load vs batching.")
@click.option("--instances", type=limits.option_type(limits.INSTANCES), default=1, show_default=True)
@click.option("--threads", type=limits.option_type(limits.THREADS), default=1, show_default=True,
              help="python kind: ONNX Runtime threads per instance (instances x threads <= cores).")
@click.option("--cpu", is_flag=True, help="onnxruntime kind: serve on the CPU (KIND_CPU) instead of the GPU "
                                         "(the python kind always runs on the CPU).")
@click.option("--force", is_flag=True, help="Replace an existing model directory.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def triton_main(bundle_dir, repository, repository_kind, name, graph, max_batch, max_sequences, idle_seconds,
                queue_delay_us, instances, threads, cpu, force, verbose):
    """Write a Triton Inference Server model repository for a bundle.

    \b
    Examples:
      rmt-triton --bundle model-fp32 --repo models --max-batch 8            # GPU: ONNX Runtime backend
      rmt-triton --bundle model-fp32 --repo models --kind python --instances 2   # CPU: Python backend

    onnxruntime kind: the sequence batcher keeps each sequence's memory in the server
    (implicit state: memory -> new_memory, starting from memory_init.npy; an ARMT's
    W_mem.{l}/z.{l} per layer, starting from zeros); clients stream fixed-size segments.
    python kind: the model keeps each sequence's state and partial segment by correlation
    id; clients stream chunks of any length. Either kind:
    rmt_runtime.triton_client.TritonRMTClient. docs/SCALING.md says which to use where.
    """
    from .triton import TritonOptions, write_triton_repository

    if repository_kind == "python" and graph != "ingest":
        raise click.UsageError("--graph step is for the onnxruntime kind; the python kind returns last-token logits")
    if repository_kind != "python" and threads != 1:
        raise click.UsageError("--threads is for the python kind (ONNX Runtime inside the Python backend); the "
                               "onnxruntime backend's threads are set in Triton's own backend config")
    options = TritonOptions(name=name, graph=graph, max_batch_size=max_batch, instances=instances,
                            kind=None if repository_kind == "python" else ("KIND_CPU" if cpu else "KIND_GPU"),
                            repository_kind=repository_kind, max_sequences=max_sequences,
                            max_sequence_idle_us=int(round(idle_seconds * 1e6)), max_queue_delay_us=queue_delay_us,
                            threads=threads)
    model_dir = _run_guarded(verbose, False, lambda: write_triton_repository(bundle_dir, repository, options, force))
    click.echo(str(model_dir))
