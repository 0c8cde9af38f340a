"""Import Hugging Face safetensors checkpoints (local files only) into our NNX models.

`from_pretrained(local_dir)` reads `config.json`, picks the model family from its `model_type`
through `FAMILIES`, builds the model abstractly (`nnx.eval_shape`, nothing allocated), reads the
tensors as numpy (bfloat16 through ml_dtypes: safetensors' own numpy loader has no BF16), maps
names with the family's explicit key map, and fills the model. Every missing, unexpected and
shape-mismatched tensor is reported together in one `HFImportError`.

A family module (e.g. coso_jax.models.llama, coso_jax.models.llava) provides:
  * `config_from_hf(hf_config: dict, *, dtype, param_dtype) -> config`
  * `build_model(config, *, rngs: nnx.Rngs) -> nnx.Module`
  * `hf_key_map(config) -> list[(hf_key, nnx_path | None, transform | None)]` — `nnx_path` is the tuple
    path of an `nnx.Variable` in the model (ints for list indices); `None` marks a tensor that may be
    present and is ignored; `transform(np.ndarray) -> np.ndarray` converts the layout (e.g. transpose).
"""
from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

# model_type (config.json) -> module implementing the family functions (imported lazily).
FAMILIES: dict[str, str] = {
    "llama": "coso_jax.models.llama",
    "mistral": "coso_jax.models.llama",
    "qwen2": "coso_jax.models.llama",
    "llava": "coso_jax.models.llava",
    "llava_next": "coso_jax.models.llava",
    "clip_vision_model": "coso_jax.models.clip",
    "t5": "coso_jax.models.t5",
}

KeyMap = Iterable[tuple[str, Optional[tuple], Optional[Callable[[np.ndarray], np.ndarray]]]]

# safetensors dtype tags -> numpy dtypes (BF16 via ml_dtypes).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class HFImportError(ValueError):
    """A checkpoint does not match the model. Lists every problem at once.

    Attributes: `missing` (HF keys the model needs but the checkpoint lacks), `unexpected`
    (checkpoint keys the key map does not know), `mismatched` ((key, checkpoint shape after
    transform, model shape)), `uncovered` (model variables no key-map entry fills: a key-map bug).
    """

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), uncovered=()):
        self.source, self.missing, self.unexpected = source, list(missing), list(unexpected)
        self.mismatched, self.uncovered = list(mismatched), list(uncovered)
        lines = [f"checkpoint {source} does not match the model:"]
        if self.missing:
            lines.append(f"  missing tensors ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected tensors ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for key, got, want in self.mismatched:
            lines.append(f"  shape mismatch: {key}: checkpoint {tuple(got)} (after transform) vs model {tuple(want)}")
        if self.uncovered:
            lines.append(f"  model variables not filled by the key map ({len(self.uncovered)}): "
                         + ", ".join(".".join(map(str, p)) for p in self.uncovered))
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
def read_hf_config(local_dir: str | Path) -> dict:
    path = Path(local_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {local_dir} (from_pretrained reads local directories only)")
    return json.loads(path.read_text())


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as read-only numpy arrays (memory-mapped, no copy).

    Parses the format directly (8-byte little-endian header size, JSON header, raw buffer) so bf16
    works without torch or jax.
    """
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} byte range {end - start} != shape {shape} x {dtype}")
        tensors[name] = buffer[start:end].view(dtype).reshape(shape)
    return tensors


def safetensors_files(local_dir: str | Path) -> list[Path]:
    """`model.safetensors`, or the shards named by `model.safetensors.index.json`."""
    local_dir = Path(local_dir)
    index = local_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [local_dir / name for name in sorted(set(weight_map.values()))]
    elif (local_dir / "model.safetensors").is_file():
        files = [local_dir / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {local_dir}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} named by the index is missing")
    return files


def load_hf_tensors(local_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a local HF checkpoint directory, by HF name (memory-mapped numpy)."""
    tensors: dict[str, np.ndarray] = {}
    for f in safetensors_files(local_dir):
        for name, x in read_safetensors(f).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard of {local_dir}")
            tensors[name] = x
    return tensors


# --------------------------------------------------------------------------------------------------
# Filling a model
# --------------------------------------------------------------------------------------------------
def apply_key_map(abstract_model: nnx.Module, tensors: Mapping[str, np.ndarray], key_map: KeyMap, *,
                  source: str = "<tensors>") -> nnx.Module:
    """Returns a concrete copy of `abstract_model` (from `nnx.eval_shape`) filled from `tensors`.

    Each tensor is transformed, shape-checked against the model and cast to the model variable's
    dtype. Raises `HFImportError` listing all missing / unexpected / mismatched keys and any model
    variable the key map leaves unfilled.
    """
    graphdef, state = nnx.split(abstract_model)
    flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    values: dict[tuple, Any] = {}
    missing, mismatched, used, bad_paths, reported = [], [], set(), [], set()
    for hf_key, path, transform in key_map:
        if path is None:  # tolerated, ignored
            used.add(hf_key)
            continue
        path = tuple(path)
        if path not in flat:
            bad_paths.append(path)
            continue
        if hf_key not in tensors:
            missing.append(hf_key)
            reported.add(path)
            continue
        used.add(hf_key)
        x = tensors[hf_key]
        x = transform(x) if transform is not None else x
        want = flat[path].get_value()
        if tuple(x.shape) != tuple(want.shape):
            mismatched.append((hf_key, x.shape, want.shape))
            reported.add(path)
            continue
        values[path] = np.asarray(x).astype(want.dtype)
    if bad_paths:  # a key-map bug, not a checkpoint problem: say so plainly
        raise KeyError("key map names model paths that do not exist: "
                       + ", ".join(".".join(map(str, p)) for p in bad_paths))
    unexpected = sorted(k for k in tensors if k not in used)
    uncovered = [p for p in flat if p not in values and p not in reported]
    if missing or unexpected or mismatched or uncovered:
        raise HFImportError(source, missing, unexpected, mismatched, uncovered)
    new_flat = [(path, var.replace(jnp.asarray(values[path]))) for path, var in flat.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _family(model_type: str | None):
    if model_type not in FAMILIES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def from_pretrained(local_dir: str | Path, dtype: Any = jnp.float32, param_dtype: Any = None) -> nnx.Module:
    """Loads a local Hugging Face checkpoint directory into our NNX model.

    Args:
      local_dir: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: compute dtype of the model (e.g. jnp.float32, jnp.bfloat16).
      param_dtype: parameter storage dtype; defaults to `dtype`.
    Returns:
      The model (e.g. `CausalLM` for llama/mistral/qwen2), whose call matches the HF PyTorch model's.
    """
    hf_config = read_hf_config(local_dir)
    family = _family(hf_config.get("model_type"))
    key_map = list(family.hf_key_map(config := family.config_from_hf(
        hf_config, dtype=dtype, param_dtype=param_dtype or dtype)))
    abstract = nnx.eval_shape(lambda: family.build_model(config, rngs=nnx.Rngs(0)))
    tensors = load_hf_tensors(local_dir)
    # Some families accept several historical key layouts (e.g. hub LLaVA checkpoints name the
    # vision weights `vision_tower.vision_model.*`); they map them onto one canonical layout.
    if hasattr(family, "normalize_hf_tensors"):
        tensors = family.normalize_hf_tensors(tensors)
    return apply_key_map(abstract, tensors, key_map, source=str(local_dir))
