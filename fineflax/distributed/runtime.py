"""What a program sets up before its first compilation: the devices JAX uses, logged, with
a stop when the machine has an accelerator that JAX does not use, and the compilation cache.

A CPU-only jaxlib on a GPU machine (what `pip install -e .` gives) would otherwise train on
the CPU, 100x slower, after one warning from JAX. The accelerator is recognised the way
its drivers show it: an NVIDIA device node (`/dev/nvidia0`) or `nvidia-smi` on the PATH;
a TPU's device node (`/dev/accel0`, TPU v2-v4) or a Google TPU on the PCI bus (vendor
0x1ae0, how TPU v5 and later show on their VMs). `FINEFLAX_ALLOW_CPU=1`, or
`JAX_PLATFORMS=cpu` (JAX told to use the CPU), runs on the CPU anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping

import jax

from fineflax.errors import FineflaxError

logger = logging.getLogger('fineflax.runtime')
ENV_ALLOW_CPU = 'FINEFLAX_ALLOW_CPU'
ENV_CACHE = 'FINEFLAX_CACHE'
GOOGLE_PCI_VENDOR = '0x1ae0'  # TPUs; JAX's own TPU detection reads the same file
INSTALL = {
    'gpu': "pip install -e '.[cuda12]' -c constraints.txt (with CUDA 13 drivers: '.[cuda13]')",
    'tpu': "pip install -e '.[tpu]' -c constraints.txt",
}


class AcceleratorUnusedError(FineflaxError, RuntimeError):
  """The machine has a GPU or TPU, but JAX runs on the CPU."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """An accelerator the machine shows: its kind ('gpu', 'tpu'), what it is, the evidence."""

  kind: str
  name: str
  evidence: str


def detect(root: str | os.PathLike = '/', path: str | None = None) -> list[Accelerator]:
  """The accelerators that the device nodes and PCI devices under `root` (the file-system
  root, replaceable for tests) and the programs on `path` (default: $PATH) show."""
  root = Path(root)
  found = []
  nodes = sorted((root / 'dev').glob('nvidia[0-9]*'))
  smi = shutil.which('nvidia-smi', path=path)
  if nodes or smi:
    found.append(
        Accelerator('gpu', 'an NVIDIA GPU', str(nodes[0]) if nodes else f'{smi} on the PATH')
    )
  tpu_nodes = sorted((root / 'dev').glob('accel[0-9]*'))
  tpu_pci = [
      p.parent
      for p in sorted((root / 'sys/bus/pci/devices').glob('*/vendor'))
      if _read(p) == GOOGLE_PCI_VENDOR
  ]
  if tpu_nodes or tpu_pci:
    found.append(
        Accelerator(
            'tpu',
            'a TPU',
            str(tpu_nodes[0])
            if tpu_nodes
            else f'PCI device {tpu_pci[0]} of vendor {GOOGLE_PCI_VENDOR}',
        )
    )
  return found


def _read(path: Path) -> str:
  try:
    return path.read_text().strip().lower()
  except OSError:
    return ''


def cpu_allowed(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the user asked for the CPU: FINEFLAX_ALLOW_CPU=1 or JAX_PLATFORMS=cpu."""
  allow = environ.get(ENV_ALLOW_CPU, '').strip().lower() in ('1', 'true', 'yes')
  return allow or (jax.config.jax_platforms or '').strip().lower() == 'cpu'


def describe_devices() -> str:
  """'backend gpu: 8 x NVIDIA H100 80GB HBM3 (8 local), 1 process'."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (
      f'backend {jax.default_backend()}: {len(devices)} x {", ".join(kinds)} '
      f'({jax.local_device_count()} local), {jax.process_count()} process(es)'
  )


def check_backend(
    root: str | os.PathLike = '/', path: str | None = None, environ: Mapping[str, str] = os.environ
) -> None:
  """Logs the devices JAX uses; raises AcceleratorUnusedError when JAX runs on the CPU of
  a machine that has an accelerator (`detect(root, path)`) and the CPU was not asked for."""
  logger.info('devices: %s', describe_devices())
  if jax.default_backend() != 'cpu' or cpu_allowed(environ):
    return
  found = detect(root, path)
  if found:
    first = found[0]
    raise AcceleratorUnusedError(
        f'this machine has {first.name} ({first.evidence}) but JAX runs on the CPU: '
        f'install JAX for it with `{INSTALL[first.kind]}`, or set {ENV_ALLOW_CPU}=1 to run '
        'on the CPU anyway'
    )


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
  """fineflax's cache folder: $FINEFLAX_CACHE, else ~/.cache/fineflax."""
  return Path(environ.get(ENV_CACHE) or Path.home() / '.cache' / 'fineflax')


def use_compilation_cache() -> Path:
  """Keeps compiled steps on disk, so a resumed or repeated run skips most compilation.

  A cache the user set up (JAX_COMPILATION_CACHE_DIR, or jax's config option) is used as
  it is; otherwise `$FINEFLAX_CACHE/xla`. Returns the folder.
  """
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    logger.info('compilation cache: %s (set for JAX)', configured)
    return Path(configured)
  folder = cache_root() / 'xla'
  jax.config.update('jax_compilation_cache_dir', str(folder))
  logger.info('compilation cache: %s', folder)
  return folder


def start(uses_devices: bool = True) -> None:
  """A program's set-up after it joined its job: the device check and the cache."""
  if uses_devices:
    check_backend()
    use_compilation_cache()
