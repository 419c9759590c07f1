"""The `npz` and `safetensors` formats: a checkpoint's params and batch_stats as flat
arrays, for use without fineflax.

Keys are the '/'-joined paths of the variables tree ('params/backbone/conv1_conv/kernel',
'batch_stats/backbone/conv1_bn/mean'); the arrays are the checkpoint's, float32, bit for
bit (not folded: a reader rebuilds the network). The metadata (`serving.metadata`: class
names, step, the run's config, the temperature `evaluate --calibrate` saved) goes into a
.npz as one more array, `__metadata__`, a JSON string; into a .safetensors file's
metadata as strings, each value JSON-encoded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fineflax.pytree import path_str

NPZ_METADATA_KEY = '__metadata__'


def flatten(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'params/backbone/conv1_conv/kernel': array, ...} of a variables tree, as host arrays."""
  return {
      path_str(path): np.ascontiguousarray(np.asarray(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """`arrays` and, under `__metadata__`, `meta` as a JSON string (np.load reads both
  without pickle)."""
  with open(path, 'wb') as f:  # a file object: np.savez appends no suffix
    np.savez(f, **arrays, **{NPZ_METADATA_KEY: np.array(json.dumps(meta))})


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """`arrays` with `meta` in the header, each value JSON-encoded (the format's metadata
  holds strings only)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top

  # Bytes written here rather than safetensors' save_file, which makes the file 0600.
  path.write_bytes(save(arrays, metadata={k: json.dumps(v) for k, v in meta.items()}))


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The arrays and metadata of a .npz or .safetensors export."""
  path = Path(path)
  if path.suffix.lower() == '.npz':
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop(NPZ_METADATA_KEY)))
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(str(path), 'numpy') as f:
    meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return {k: f.get_tensor(k) for k in f.keys()}, meta


WRITERS = {'npz': write_npz, 'safetensors': write_safetensors}
