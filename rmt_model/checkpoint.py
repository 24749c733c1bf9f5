"""Checkpoints: rmt-edge's own ``model.pt`` and import of the reference RMT code's state dicts.

An rmt-edge checkpoint is a dict of plain values and tensors, nothing executable:
``{"format": "rmt-edge/checkpoint", "version": 1, "config": <JSON text>, "state_dict": {...}}``.
Every load goes through ``torch.load(weights_only=True)``, so a pickle that would run
code is refused before any of it runs.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .armt import ARMTDecoder, build_armt_model
from .config import ARMTSettings, RMTConfig
from .errors import CheckpointError, ConfigError
from .model import RMTBase, build_model

CHECKPOINT_FORMAT = "rmt-edge/checkpoint"
CHECKPOINT_VERSION = 1

# Buffers older transformers releases saved in GPT-2 state dicts; they hold no weights
# (the causal mask and a constant) and today's modules rebuild them.
_LEGACY_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Buffers the reference encoder registers next to its backbone (ids, not weights).
_REFERENCE_ENCODER_BUFFERS = ("mem_token_ids", "cls_token", "sep_token", "eos_token", "bos_token")


# What a checkpoint reader opens is bounded before it is read (rmt_model may not import
# rmt_runtime.limits; tests/reliability/test_bounds.py checks the two agree). A JSON config (a
# backbone's config.json, a shard index): published ones are under 1 MiB.
CONFIG_BYTES = 16 * 2 ** 20


def memory_bytes() -> int:
    """This machine's memory: torch.load and safetensors hold a whole checkpoint in it (1 TiB
    where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2 ** 40


def _file_kind(mode: int) -> str:
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def check_checkpoint_file(path: Path, what: str, limit: int | None = None) -> int:
    """The size of ``path``, a regular file of at most ``limit`` bytes (default: this machine's
    memory); else a CheckpointError naming the file, what it is and the limit. Decided on
    ``stat``, without opening it: a FIFO where a checkpoint is expected cannot hang the check."""
    limit = memory_bytes() if limit is None else limit
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: is {_file_kind(info.st_mode)}, expected {what} (a regular file)")
    if info.st_size > limit:
        holds = "this machine's memory" if limit == memory_bytes() else "the limit"
        raise CheckpointError(f"{path}: is {info.st_size:,} bytes, more than {holds} ({limit:,} bytes) for {what}")
    return info.st_size


def _read_config_text(path: Path, what: str) -> str:
    """A JSON config's text: a regular file of at most CONFIG_BYTES, opened non-blocking."""
    check_checkpoint_file(path, what, CONFIG_BYTES)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced since the check
                raise CheckpointError(f"{path}: is not a regular file, expected {what}")
            data = handle.read(CONFIG_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > CONFIG_BYTES:
        raise CheckpointError(f"{path}: grew past {CONFIG_BYTES:,} bytes while read, the limit for {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}), expected {what}") from None


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError; the
    file is a regular one that fits in memory (checked before it is opened)."""
    path = Path(path)
    check_checkpoint_file(path, "a checkpoint file")
    _refuse_decompression_bomb(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects beyond tensors and plain values "
                "(loading them could run code); expected a state dict or an rmt-edge checkpoint") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Weights only load failed" in text:
            # The useful line is the unpickler's own complaint, not torch's advice.
            lines = [line for line in lines if line.startswith("Unsupported")] or ["not a pickle"]
        reason = lines[0] if lines else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


# torch writes its zip archives uncompressed: what they unpack to is about their own size.
_MAX_UNPACK_RATIO = 4


def _refuse_decompression_bomb(path: Path) -> None:
    """A zip whose entries unpack to far more than the file holds is refused unread."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # torch.load reports it as unreadable
    size = path.stat().st_size
    if declared > _MAX_UNPACK_RATIO * size + (1 << 20):
        raise CheckpointError(f"{path}: refused: its zip entries unpack to {declared:,} bytes from a "
                              f"{size:,}-byte file (a decompression bomb; torch checkpoints are stored uncompressed)")


def save_checkpoint(model: RMTBase, path: str | os.PathLike) -> Path:
    """Write ``model`` (config + weights) to ``path`` atomically; return the path. An existing
    ``path`` is replaced only when it is a regular file that is empty or a torch checkpoint
    (never a link, a folder or a file of another kind): CheckpointError, checked first."""
    path = Path(path)
    reason = _replace_reason(path)
    if reason:
        raise CheckpointError(f"{path} {reason}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    _save_atomically(payload, Path(path))
    return path


def _mode_for(path: Path) -> int:
    """The existing file's mode, else 0666 less the umask (read from /proc where it can be)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:
        umask = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _replace_reason(path: Path) -> str | None:
    """Why a checkpoint may not replace ``path`` (None: it may). The rule of
    ``rmt_runtime.owned_files.replace_reason`` for a torch checkpoint, restated here because
    rmt_model imports nothing of rmt-edge's other packages (docs/ARCHITECTURE.md)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link; rmt-edge replaces only a regular file, never a link (give the file itself)"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; give the path of a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a device, a FIFO or a socket); rmt-edge replaces only regular files"
    if info.st_size == 0:
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                return None
    except (zipfile.BadZipFile, OSError):
        pass
    return ("exists and is not a torch checkpoint: rmt-edge replaces only a file of the kind it writes, so "
            "nothing was changed (remove it or give another path)")


def _save_atomically(payload: dict, path: Path) -> None:
    """torch.save into a temporary file beside ``path`` (named as ``owned_files.temporary_name``
    names them), fsynced, then renamed over it: a reader (or a crash) sees the old checkpoint or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            # The temporary file is 0600: give the checkpoint the mode open() would (or the
            # mode of the file it replaces), so that others the directory allows can read it.
            os.fchmod(handle.fileno(), _mode_for(path))
            os.fsync(handle.fileno())
        reason = _replace_reason(path)  # again: it may have changed while torch.save ran
        if reason:
            raise CheckpointError(f"{path} {reason}")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # the file created above (O_EXCL): ours
        raise


def load_checkpoint(path: str | os.PathLike) -> RMTBase:
    """Rebuild the model saved by ``save_checkpoint`` from the file alone (eval mode)."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        if isinstance(payload, dict) and any(".W_mq." in str(k) for k in payload):
            raise CheckpointError(
                f"{path}: this is a state dict of the reference ARMT code, not an rmt-edge checkpoint; "
                "import it with its config.json and the code version that trained it (import_armt_checkpoint)")
        if isinstance(payload, dict) and any(str(k).startswith(("memory_cell.", "model.")) for k in payload):
            raise CheckpointError(
                f"{path}: this is a state dict of the reference RMT code, not an rmt-edge checkpoint; "
                "import it with its backbone config.json, num_mem_tokens and segment_size")
        raise CheckpointError(f"{path}: not an rmt-edge checkpoint (expected a dict with "
                              f"format={CHECKPOINT_FORMAT!r})")
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not supported "
                              f"(this rmt-edge reads version {CHECKPOINT_VERSION})")
    try:
        config = RMTConfig.from_dict(json.loads(payload["config"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: checkpoint config is unreadable ({exc})") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {exc}") from None
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict")
    model = build_armt_model(config) if config.kind == "armt" else build_model(config)
    _load_strict(model, state_dict, str(path))
    return model


def _load_strict(model: RMTBase | ARMTDecoder, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every weight, refusing missing, unexpected or mis-shaped keys by name."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
                  for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if mis_shaped:
        problems.append(f"wrong shapes {mis_shaped[:5]}{' ...' if len(mis_shaped) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the {model.config.family} "
                              f"{model.config.kind} RMT: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


# What a checkpoint directory may hold, in the order looked for: a sharded safetensors
# index, one safetensors file (huggingface_hub's PyTorchModelHubMixin), a torch pickle.
SHARD_INDEX = "model.safetensors.index.json"
DIRECTORY_LAYOUTS = (SHARD_INDEX, "model.safetensors", "pytorch_model.bin")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """A reference state dict (names -> tensors) from any published layout, and what was read.

    ``path``: a torch pickle (``.bin``/``.pt``, loaded with weights_only), a ``.safetensors``
    file, a ``model.safetensors.index.json``, or a directory holding one of
    ``DIRECTORY_LAYOUTS``. Every failure is one CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in DIRECTORY_LAYOUTS if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: a checkpoint directory needs one of {list(DIRECTORY_LAYOUTS)}; "
                                  f"it holds {sorted(p.name for p in path.iterdir())[:10]}")
        path = found
    if path.name.endswith(".index.json"):
        return _read_shards(path), f"{path.name} ({path.parent})"
    if path.suffix == ".safetensors":
        return _read_safetensors(path), str(path)
    raw = read_torch_file(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: this is an rmt-edge checkpoint; load it directly")
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        raw = raw["model_state_dict"]  # the reference trainer's wrapping
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors)")
    return dict(raw), str(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file through the safetensors library, which checks the header's offsets
    and sizes against the file before reading a tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_checkpoint_file(path, "a safetensors file")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None


def _read_shards(index_path: Path) -> dict[str, torch.Tensor]:
    """Every shard a ``model.safetensors.index.json`` names, checked against its weight map:
    shard names stay inside the directory, every shard exists, every mapped key is in its shard."""
    try:
        index = json.loads(_read_config_text(index_path, "a shard index"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path}: not a readable shard index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: a shard index needs a 'weight_map' of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    outside = [name for name in shards if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index_path}: shard names must be files beside the index, got {outside[:3]}")
    missing = [name for name in shards if not (index_path.parent / name).exists()]
    if missing:
        raise CheckpointError(f"{index_path}: shard(s) {missing} named in the index are missing from "
                              f"{index_path.parent}")
    total = sum(check_checkpoint_file(index_path.parent / name, "a safetensors shard") for name in shards)
    if total > memory_bytes():  # every shard is held at once
        raise CheckpointError(f"{index_path}: its shards hold {total:,} bytes, more than this machine's memory "
                              f"({memory_bytes():,} bytes)")
    state_dict: dict[str, torch.Tensor] = {}
    for name in shards:
        tensors = _read_safetensors(index_path.parent / name)
        absent = [key for key, shard in weight_map.items() if shard == name and key not in tensors]
        if absent:
            raise CheckpointError(f"{index_path.parent / name}: lacks {absent[:3]}, which the index places there")
        state_dict.update(tensors)
    return state_dict


def import_reference_checkpoint(state_dict_path: str | os.PathLike,
                                backbone_config_path: str | os.PathLike, *,
                                num_mem_tokens: int, segment_size: int,
                                kind: str = "decoder", note: Callable[[str], None] | None = None,
                                **encoder_ids: int) -> RMTBase:
    """Load a state dict saved by the reference RMT code (any layout ``read_state_dict`` reads).

    Decoder: RecurrentWrapper keys ``memory_cell.memory`` and ``memory_cell.model.<backbone>``.
    Encoder: RMTEncoderForSequenceClassification keys ``model.<backbone>`` (word embeddings
    already widened by M memory rows), plus its id buffers, which are dropped.
    ``backbone_config_path`` is the base model's config.json (e.g. GPT-2's).
    ``encoder_ids``: cls_token_id, sep_token_id, pad_token_id for an encoder.
    ``note``: told what was read and which dtypes were converted to float32.
    """
    raw, source = read_state_dict(state_dict_path)
    converted = sorted({str(v.dtype).replace("torch.", "") for v in raw.values()
                        if v.is_floating_point() and v.dtype != torch.float32})
    if note is not None:
        note(f"{len(raw)} tensors from {source}" + (
            f"; {'/'.join(converted)} weights converted to float32 (export computes in float32, then casts "
            "to the bundle's precision)" if converted else ""))
    backbone = _read_backbone_config(backbone_config_path)
    try:
        config = RMTConfig(kind=kind, backbone=backbone, num_mem_tokens=num_mem_tokens,
                           segment_size=segment_size, **encoder_ids)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{state_dict_path}: {exc}") from None
    model = build_model(config)
    state_dict = _reference_to_native(raw, kind, set(model.state_dict()))
    _load_strict(model, state_dict, source)
    return model


def _read_backbone_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: backbone config.json not found")
    try:
        backbone = json.loads(_read_config_text(path, "a backbone config.json"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not a JSON backbone config ({exc})") from None
    if not isinstance(backbone, dict) or "model_type" not in backbone:
        raise CheckpointError(f"{path}: a backbone config.json needs a 'model_type' "
                              "(as Hugging Face writes it)")
    return backbone


def _reference_to_native(raw: Mapping[str, torch.Tensor], kind: str,
                         native_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename reference keys to this package's; drop buffers that carry no weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if kind == "decoder":
            if key == "memory_cell.memory":
                out["memory"] = value
                continue
            if not key.startswith("memory_cell.model."):
                out[key] = value  # reported as unexpected by the strict load
                continue
            name = key[len("memory_cell."):]
        else:
            if key in _REFERENCE_ENCODER_BUFFERS:
                continue
            name = key
        if name.endswith(_LEGACY_BUFFER_SUFFIXES) and name not in native_keys:
            continue
        out[name] = value
    # A tied LM head may be saved under one name only.
    if "model.lm_head.weight" in native_keys and "model.lm_head.weight" not in out:
        for tied in ("model.transformer.wte.weight", "model.model.embed_tokens.weight",
                     "model.gpt_neox.embed_in.weight"):
            if tied in out and "model.lm_head.weight" not in out:
                out["model.lm_head.weight"] = out[tied]
    return out


# ---- ARMT: the reference code's AssociativeRecurrentWrapper state dicts ------------------------
# Hugging Face-format ARMT checkpoints (ARMTForCausalLM) hold the wrapper under this prefix.
_ARMT_HF_PREFIX = "armt."
# The ARMT HF config.json fields that map onto ARMTSettings / RMTConfig.
_ARMT_HF_FIELDS = {"d_mem": "d_mem", "n_heads": "heads", "use_sink": "use_sink", "correction": "correction"}
# Reference options whose arithmetic rmt_model does not implement (name, value it must have).
_ARMT_UNSUPPORTED = (("wrap_pos", False), ("use_denom", True), ("gating", False),
                     ("sliding_window", False), ("attend_to_previous_input", False))


def import_armt_checkpoint(state_dict_path: str | os.PathLike, config_path: str | os.PathLike, *,
                           segment_size: int | None = None, version: str = "normalized",
                           correction: bool | None = None, lora_alpha: float | None = None,
                           note: Callable[[str], None] | None = None) -> ARMTDecoder:
    """Load a state dict saved by the reference ARMT code (any layout ``read_state_dict`` reads).

    Keys: ``memory_cell.memory``, optional ``memory_cell.sink``, the wrapped blocks'
    ``memory_cell.model.<layers>.{i}.W_mq/W_mk/W_mv/W_mb.*`` and ``...{i}.layer.*``, the rest
    of the backbone under ``memory_cell.model.*``; a Hugging Face-format ARMT adds the prefix
    ``armt.``; older classes' ``memory_cell.layers.*`` duplicates are dropped; PEFT LoRA
    adapters (``lora_A``/``lora_B``) are merged into their base weights with scale
    ``lora_alpha / r`` (r read off lora_A).

    ``config_path``: the base model's config.json, or an ARMT config.json (model_type "armt"
    with ``base_model_config``), whose d_mem, n_heads, use_sink, correction, num_mem_tokens and
    segment_size are then used. M, d_mem, heads and the sink are read off the tensors (and
    checked against such a config); ``version`` cannot be and must be told (docs/ARMT.md).
    """
    raw, source = read_state_dict(state_dict_path)
    converted = sorted({str(v.dtype).replace("torch.", "") for v in raw.values()
                        if v.is_floating_point() and v.dtype != torch.float32})
    state_dict, dropped, merged = _armt_reference_to_native(raw, lora_alpha, source)
    if note is not None:
        note(f"{len(raw)} tensors from {source}"
             + (f"; dropped {dropped} duplicate memory_cell.layers.* tensors" if dropped else "")
             + (f"; merged {merged} LoRA adapters (scale lora_alpha / r)" if merged else "")
             + (f"; {'/'.join(converted)} weights converted to float32" if converted else ""))
    backbone, declared = _read_armt_config(config_path)
    geometry = _armt_geometry(state_dict, backbone, source)
    for key, value in declared.items():
        if key in geometry and geometry[key] != value:
            raise CheckpointError(f"{config_path}: says {key}={value!r} but {source} holds "
                                  f"{key}={geometry[key]!r}")
    if segment_size is None:
        segment_size = declared.get("segment_size")
    if segment_size is None:
        raise CheckpointError(f"{state_dict_path}: segment_size is not in {config_path}; pass it")
    if correction is None:
        correction = declared.get("correction", True)
    try:
        settings = ARMTSettings(d_mem=geometry["d_mem"], heads=geometry["heads"],
                                use_sink=geometry["use_sink"], correction=correction, version=version)
        config = RMTConfig(kind="armt", backbone=backbone, num_mem_tokens=geometry["num_mem_tokens"],
                           segment_size=segment_size, armt=settings)
        model = build_armt_model(config)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{state_dict_path}: {exc}") from None
    keys = set(model.state_dict())
    if "model.lm_head.weight" in keys and "model.lm_head.weight" not in state_dict:
        for tied in ("model.transformer.wte.weight", "model.model.embed_tokens.weight"):
            if tied in state_dict:
                state_dict["model.lm_head.weight"] = state_dict[tied]
                break
    _load_strict(model, state_dict, source)
    return model


def _read_armt_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone config dict, what an ARMT config.json declares) from a base or ARMT config.json."""
    data = _read_backbone_config(path)
    if data["model_type"] != "armt":
        return data, {}
    base = data.get("base_model_config")
    if not isinstance(base, dict) or "model_type" not in base:
        raise CheckpointError(f"{path}: an ARMT config.json needs base_model_config as a dict with a "
                              "'model_type'; pass the base model's own config.json instead")
    for name, value in _ARMT_UNSUPPORTED:
        if name in data and data[name] != value:
            raise CheckpointError(f"{path}: {name}={data[name]!r} is not supported (rmt_model implements "
                                  f"{name}={value!r} only; docs/ARMT.md)")
    declared = {ours: data[theirs] for theirs, ours in _ARMT_HF_FIELDS.items() if theirs in data}
    for name in ("num_mem_tokens", "segment_size"):
        if name in data:
            declared[name] = data[name]
    return base, declared


def _armt_geometry(state_dict: Mapping[str, torch.Tensor], backbone: dict[str, Any],
                   source: str) -> dict[str, Any]:
    """num_mem_tokens, d_mem, heads and use_sink as the tensors say."""
    memory = state_dict.get("memory")
    w_mq = next((v for k, v in state_dict.items() if k.endswith(".W_mq.weight")), None)
    w_mb = next((v for k, v in state_dict.items() if k.endswith(".W_mb.weight")), None)
    if memory is None or w_mq is None or w_mb is None:
        raise CheckpointError(f"{source}: not an ARMT state dict (expected memory_cell.memory and "
                              "per-layer W_mq/W_mb weights)")
    return {"num_mem_tokens": int(memory.shape[0]), "d_mem": int(w_mq.shape[0]),
            "heads": int(w_mb.shape[0]), "use_sink": "sink" in state_dict}


def _armt_reference_to_native(raw: Mapping[str, torch.Tensor], lora_alpha: float | None,
                              source: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Rename reference ARMT keys to ARMTDecoder's; (state dict, duplicates dropped, LoRA merged)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, value in raw.items():
        name = key[len(_ARMT_HF_PREFIX):] if key.startswith(_ARMT_HF_PREFIX) else key
        if name.startswith("memory_cell.layers."):
            dropped += 1
            continue
        if name in ("memory_cell.memory", "memory_cell.sink"):
            renamed[name[len("memory_cell."):]] = value
            continue
        if name.startswith("memory_cell.model."):
            name = name[len("memory_cell."):].replace(".base_model.model.", ".", 1)
            if name.endswith(_LEGACY_BUFFER_SUFFIXES):
                continue
        renamed[name] = value  # anything else is reported as unexpected by the strict load
    adapters = len(_lora_pairs(renamed))
    return _merge_lora(renamed, lora_alpha, source), dropped, adapters


def _lora_pairs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module prefix -> (lora_A key, lora_B key) for every PEFT adapter in the state dict."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state_dict:
        if ".lora_A." in key:
            prefix, _, rest = key.partition(".lora_A.")
            other = f"{prefix}.lora_B.{rest}"
            pairs[prefix] = (key, other)
    return pairs


def _merge_lora(state_dict: dict[str, torch.Tensor], lora_alpha: float | None,
                source: str) -> dict[str, torch.Tensor]:
    """W = W_base + (lora_alpha / r) B A for each adapter; the adapter keys removed."""
    pairs = _lora_pairs(state_dict)
    if not pairs:
        return state_dict
    if lora_alpha is None:
        raise CheckpointError(f"{source}: holds {len(pairs)} LoRA adapters (e.g. {next(iter(pairs))}); "
                              "pass lora_alpha (from the adapter's config) to merge them")
    out = dict(state_dict)
    for prefix, (a_key, b_key) in pairs.items():
        if b_key not in out:
            raise CheckpointError(f"{source}: {a_key} has no matching {b_key}")
        base_key = next((k for k in (f"{prefix}.base_layer.weight", f"{prefix}.weight") if k in out), None)
        if base_key is None:
            raise CheckpointError(f"{source}: LoRA adapter {a_key} has no base weight "
                                  f"({prefix}.base_layer.weight or {prefix}.weight)")
        lora_a, lora_b = out.pop(a_key).float(), out.pop(b_key).float()
        scale = float(lora_alpha) / lora_a.shape[0]
        out[f"{prefix}.weight"] = out.pop(base_key).float() + scale * (lora_b @ lora_a)
        bias_key = f"{prefix}.base_layer.bias"
        if bias_key in out:
            out[f"{prefix}.bias"] = out.pop(bias_key)
    return out
