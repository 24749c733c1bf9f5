"""``rmt-build``: TensorRT engines for this machine, built on the device that runs them.

Part of the runtime (torch-free) because engines are not portable: a Jetson or GPU server
builds its own from the bundle's ONNX graphs.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import limits
from .bundle import BundleError
from .cli_support import JsonCommand, run_guarded
from .engines import BuildOptions, build_bundle_engines
from .errors import EngineError


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory.")
@click.option("--builder", type=click.Choice(["tensorrt", "tensorrt_rtx"]), default="tensorrt", show_default=True,
              help="tensorrt: the deployment builder (TensorRT 10/11, JetPack); tensorrt_rtx: RTX GPUs / CPU AOT.")
@click.option("--fp16", is_flag=True, help="TensorRT 10 only: let an fp32 graph run layers in fp16 "
                                           "(TensorRT 11 needs an fp16 export instead).")
@click.option("--tf32", is_flag=True, help="fp32 bundles: let TensorRT run fp32 layers as TF32 (Ampere and "
                                           "later; off by default, so an fp32 engine computes in fp32).")
@click.option("--workspace", "workspace_mb", type=limits.option_type(limits.WORKSPACE_MB), default=1024,
              show_default=True,
              help="Builder workspace cap in MB (keep it small on 8 GB Jetson boards).")
@click.option("--max-batch", type=limits.option_type(limits.MAX_BATCH), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the engine paths as JSON on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(bundle_dir, builder, fp16, tf32, workspace_mb, max_batch, as_json, verbose):
    """Build the TensorRT engines of a bundle on this machine, cached in <bundle>/engines.

    \b
    Examples:
      rmt-build --bundle model-fp16                 # on the Jetson / GPU that will run it
      rmt-build --bundle model-fp32 --fp16          # TensorRT 10: fp16 layers from an fp32 graph

    An engine is reused only when its key matches this machine (builder and version, GPU and
    compute capability, precision and flags, profile, graph and weights hashes); otherwise it
    is rebuilt. Loading (backend tensorrt) never builds: it takes the newest engines built here.
    Only the segment graphs get engines: generation runs on ONNX Runtime.
    """
    options = BuildOptions(builder=builder, max_batch=max_batch, workspace_mb=workspace_mb, fp16_flag=fp16,
                           tf32=tf32)
    say = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    engines = run_guarded(verbose, as_json, lambda: build_bundle_engines(bundle_dir, options, say),
                          (BundleError, EngineError))
    click.echo(json.dumps({"ok": True, "engines": engines}, indent=2) if as_json else "\n".join(engines.values()))
