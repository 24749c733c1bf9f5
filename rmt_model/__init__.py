"""rmt_model: the Recurrent Memory Transformer in PyTorch (reference for export and runtime)."""
from .armt import ARMTDecoder, ARMTOutput, build_armt_model
from .backbone import build_backbone, family_config_dict
from .checkpoint import (import_armt_checkpoint, import_reference_checkpoint, load_checkpoint, read_torch_file,
                         save_checkpoint)
from .config import ARMTSettings, RMTConfig
from .errors import CheckpointError, ConfigError, RMTError
from .model import RMTBase, RMTDecoder, RMTEncoder, RMTOutput, build_model

__all__ = [
    "RMTConfig", "RMTBase", "RMTDecoder", "RMTEncoder", "RMTOutput", "build_model", "build_backbone",
    "family_config_dict", "save_checkpoint", "load_checkpoint", "import_reference_checkpoint",
    "read_torch_file", "RMTError", "ConfigError", "CheckpointError",
    "ARMTSettings", "ARMTDecoder", "ARMTOutput", "build_armt_model", "import_armt_checkpoint",
]
