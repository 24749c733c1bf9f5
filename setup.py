"""One distribution, rmt-edge, holding three import packages.

The folders rmt_model/, export/ and runtime/ install as ``rmt_model``, ``rmt_export`` and
``rmt_runtime`` so that no generic top-level name (``runtime``, ``export``) lands in
site-packages. The runtime needs only numpy and pydantic (and click for its CLI); reading text through a
bundle's tokenizer is the ``text`` extra; torch and the export stack are the ``export`` extra.
"""
from setuptools import find_packages, setup

# Import name -> source folder. Every subpackage (rmt_runtime.backends, ...) is found, so
# the wheel holds what the source tree holds; tests and samples stay out.
PACKAGE_DIRS = {"rmt_model": "rmt_model", "rmt_export": "export", "rmt_runtime": "runtime"}


def packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


EXPORT = [
    "torch>=2.6",  # dev/test requirements pin the CPU build: see requirements-dev.txt
    "transformers>=5.0,<6",
    "onnx>=1.18",
    "onnxscript>=0.5",
    "onnxruntime>=1.22",
    "safetensors>=0.4",  # published reference checkpoints: model.safetensors and sharded indexes
]

setup(
    name="rmt-edge",
    version="0.1.0",
    description="Export Recurrent Memory Transformers to ONNX/TensorRT and run them segment by segment",
    python_requires=">=3.10",
    packages=packages(),
    package_dir=PACKAGE_DIRS,
    # pydantic: the one schema of every document the runtime reads (rmt_runtime.schema); binary wheels
    # on PyPI for x86 and aarch64 (Jetson), torch-free.
    install_requires=["numpy>=1.24", "click>=8.1", "pydantic>=2.6,<3"],
    extras_require={
        "export": EXPORT,
        "ort": ["onnxruntime>=1.22"],
        # The openvino backend: fp32 bundles computed in fp32 or bf16 on the CPU (docs/BENCHMARKS.md).
        "openvino": ["openvino>=2025.1"],
        "text": ["tokenizers>=0.20"],  # rmt-run --text, rmt-generate --prompt: the bundle's tokenizer.json
        "service": ["aiohttp>=3.14.5", "tokenizers>=0.20"],  # samples/memory_service.py
        "gpu": ["onnxruntime-gpu>=1.22"],
        "triton": ["tritonclient[grpc]>=2.40"],
        # Native TensorRT where pip can install it (x86; on a Jetson TensorRT comes from JetPack's apt,
        # so install only the cuda-python pin there). Two lines, by the driver's CUDA major:
        # cuda-bindings 13.x link the CUDA 13 runtime and fail on CUDA 12 drivers (< 580, JetPack 6)
        # with cudaErrorInsufficientDriver, and tensorrt-cu13's libraries need CUDA 13 too.
        "trt": ["tensorrt-cu12>=10.3", "cuda-python>=12.6,<13"],        # CUDA 12 drivers
        "trt-cu13": ["tensorrt-cu13>=10.13.2", "cuda-python>=13,<14"],    # drivers >= 580 (CUDA 13)
        "dev": ["pytest>=8", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": [
        "rmt-export=rmt_export.cli:main",
        "rmt-check-trt=rmt_export.cli:check_trt_main",
        "rmt-triton=rmt_export.cli:triton_main",
        "rmt-build=rmt_runtime.build_cli:main",
        "rmt-run=rmt_runtime.cli:main",
        "rmt-generate=rmt_runtime.generate_cli:main",
        "rmt-bench=rmt_export.bench:main",
    ]},
)
