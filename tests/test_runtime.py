"""Accelerators are never missed silently, the user's compilation cache is respected, and
the accelerator extras install the jax that constraints.txt pins."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import pytest

from fineflax.distributed import runtime
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts the programs


def _fake_machine(root: Path, *nodes: str, pci: dict[str, str] | None = None) -> Path:
  """A file-system root with the device nodes `nodes` under dev/ and PCI devices
  {address: vendor id} under sys/bus/pci/devices/."""
  (root / 'dev').mkdir(parents=True)
  for node in nodes:
    (root / 'dev' / node).touch()
  for address, vendor in (pci or {}).items():
    device = root / 'sys/bus/pci/devices' / address
    device.mkdir(parents=True)
    (device / 'vendor').write_text(vendor + '\n')
  return root


def _fake_program(folder: Path, name: str) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  program = folder / name
  program.write_text('#!/bin/sh\nexit 0\n')
  program.chmod(0o755)
  return folder


@pytest.mark.parametrize(
    'nodes, pci, kinds',
    [
        ((), None, []),
        (('null', 'nvidiactl', 'nvidia-uvm'), {'0000:00:02.0': '0x8086'}, []),  # no GPU itself
        (('nvidia0', 'nvidiactl'), None, ['gpu']),
        (('nvidia3',), None, ['gpu']),
        (('accel0',), None, ['tpu']),  # TPU v2-v4
        ((), {'0000:00:04.0': '0x1AE0'}, ['tpu']),  # TPU v5 and later
        (('nvidia0', 'accel1'), None, ['gpu', 'tpu']),
    ],
)
def test_detect_reads_device_nodes_and_pci_vendors(tmp_path, nodes, pci, kinds):
  root = _fake_machine(tmp_path / 'root', *nodes, pci=pci)
  found = runtime.detect(root, path=str(tmp_path / 'empty-path'))
  assert [a.kind for a in found] == kinds


def test_detect_finds_nvidia_smi_on_the_path(tmp_path):
  root = _fake_machine(tmp_path / 'root')
  bin_dir = _fake_program(tmp_path / 'bin', 'nvidia-smi')
  path = os.pathsep.join([str(tmp_path / 'nothing'), str(bin_dir)])
  [found] = runtime.detect(root, path=path)
  assert found.kind == 'gpu' and found.evidence == f'{bin_dir / "nvidia-smi"} on the PATH'
  (bin_dir / 'nvidia-smi').chmod(0o644)  # not a program
  assert runtime.detect(root, path=path) == []


@pytest.fixture
def jax_not_told_cpu():
  """JAX's platform setting as on a machine where nobody asked for the CPU."""
  previous = jax.config.jax_platforms
  jax.config.update('jax_platforms', None)
  yield
  jax.config.update('jax_platforms', previous)


def test_a_cpu_backend_on_a_gpu_machine_stops_with_the_install_command(
    tmp_path, caplog, jax_not_told_cpu
):
  assert jax.default_backend() == 'cpu'
  root = _fake_machine(tmp_path / 'root', 'nvidia0')
  with pytest.raises(runtime.AcceleratorUnusedError) as error:
    runtime.check_backend(root, path='', environ={})
  message = str(error.value)
  assert '\n' not in message
  assert f'has an NVIDIA GPU ({root / "dev" / "nvidia0"}) but JAX runs on the CPU' in message
  assert "pip install -e '.[cuda12]' -c constraints.txt" in message
  assert 'FINEFLAX_ALLOW_CPU=1' in message
  tpu = _fake_machine(tmp_path / 'tpu', 'accel0')
  with pytest.raises(runtime.AcceleratorUnusedError, match=re.escape("'.[tpu]'")):
    runtime.check_backend(tpu, path='', environ={})
  with caplog.at_level('INFO', logger='fineflax.runtime'):
    runtime.check_backend(root, path='', environ={'FINEFLAX_ALLOW_CPU': '1'})  # opted out
    runtime.check_backend(tmp_path / 'no-such-root', path='', environ={})  # no accelerator
  assert f'devices: backend cpu: {jax.device_count()} x cpu' in caplog.text


def test_jax_told_to_use_the_cpu_is_an_opt_out(tmp_path, jax_not_told_cpu):
  root = _fake_machine(tmp_path / 'root', 'nvidia0')
  jax.config.update('jax_platforms', 'cpu')
  runtime.check_backend(root, path='', environ={})


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
  return helpers.program_env(
      cache=tmp_path / 'cache',
      unset=('JAX_PLATFORMS', 'JAX_COMPILATION_CACHE_DIR', 'FINEFLAX_ALLOW_CPU'),
      **extra,
  )


def test_the_programs_stop_at_once_when_jax_misses_the_gpu(tmp_path):
  """`nvidia-smi` on the PATH, a CPU-only jaxlib: train and evaluate stop in one line
  before reading anything; FINEFLAX_ALLOW_CPU=1 lets them go on."""
  bin_dir = _fake_program(tmp_path / 'bin', 'nvidia-smi')
  env = _env(tmp_path, PATH=os.pathsep.join([str(bin_dir), os.environ['PATH']]))
  commands = {
      'train': [
          '-m',
          'fineflax.train',
          '--config',
          'configs/demo.py:smoke',
          '--workdir',
          str(tmp_path / 'run'),
      ],
      'evaluate': ['-m', 'fineflax.evaluate', '--workdir', str(tmp_path / 'no-run')],
  }
  for name, args in commands.items():
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, name
    last = done.stderr.strip().splitlines()[-1]
    expected = (
        f'error: this machine has an NVIDIA GPU ({bin_dir / "nvidia-smi"} on the '
        'PATH) but JAX runs on the CPU: install JAX for it with `pip install -e '
        "'.[cuda12]' -c constraints.txt (with CUDA 13 drivers: '.[cuda13]')`, or "
        'set FINEFLAX_ALLOW_CPU=1 to run on the CPU anyway'
    )
    assert last == expected, (name, done.stderr[-2000:])
  assert not (tmp_path / 'run').exists()
  done = subprocess.run(
      [sys.executable, *commands['evaluate']],
      cwd=ROOT,
      timeout=120,
      env=dict(env, FINEFLAX_ALLOW_CPU='1'),
      capture_output=True,
      text=True,
      check=False,
  )
  assert 'devices: backend cpu' in done.stderr
  assert (
      done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'no-run'}")
  ), done.stderr[-2000:]


def test_the_compilation_cache_is_the_users_when_set(tmp_path):
  script = 'from fineflax.distributed import runtime; print(runtime.use_compilation_cache())'
  ours = subprocess.run(
      [sys.executable, '-c', script],
      cwd=ROOT,
      env=_env(tmp_path),
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  assert ours.stdout.strip() == str(tmp_path / 'cache' / 'xla')
  users = subprocess.run(
      [sys.executable, '-c', script],
      cwd=ROOT,
      capture_output=True,
      env=_env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine')),
      text=True,
      timeout=120,
      check=True,
  )
  assert users.stdout.strip() == str(tmp_path / 'mine')


def test_accelerator_extras_pin_the_jax_of_the_constraints():
  pins = dict(re.findall(r'^([\w-]+)==(\S+)$', (ROOT / 'constraints.txt').read_text(), re.M))
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
  for extra in ('cuda12', 'cuda13', 'tpu'):
    assert extras[extra] == [f'jax[{extra}]=={pins["jax"]}'], extra
  assert pins['jaxlib'] == pins['jax']
