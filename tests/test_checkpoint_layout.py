"""docs/checkpoints.md is true of a real run: its key lists and tree excerpt match the demo's
checkpoints, its plain-Orbax recipe restores them in a process that cannot import fineflax,
and scripts/export.py writes what the page says, bit for bit."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fineflax import config as config_lib, models
from fineflax.pytree import path_str
from fineflax.run import RunDir, checkpoints, restore
from fineflax.train import state as state_lib
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains the demo run and starts programs on it

DOC = ROOT / 'docs' / 'checkpoints.md'
RECIPE_HEADING = '## Restore with plain Orbax (no fineflax import)'


# --- reading the page ---------------------------------------------------------------


def section(heading: str) -> str:
  """The text under `heading` (a whole line of the page) up to the next heading of the
  same or a higher level, code blocks skipped over."""
  lines = DOC.read_text().splitlines()
  assert heading in lines, f'{DOC} has no heading {heading!r}'
  level = len(heading.split()[0])
  out, in_code = [], False
  for line in lines[lines.index(heading) + 1 :]:
    in_code ^= line.startswith('```')
    if not in_code and re.match(r'#{1,%d} ' % level, line):
      break
    out.append(line)
  return '\n'.join(out)


def code_blocks(text: str, language: str) -> list[str]:
  return re.findall(rf'^```{language}\n(.*?)^```', text, re.M | re.S)


def table_keys(text: str) -> list[list[str]]:
  """The first cells (`key`, backticks removed) of each Markdown table in `text`."""
  tables, rows = [], None
  for line in text.splitlines() + ['']:
    if line.startswith('|'):
      rows = [] if rows is None else rows
      rows.append(line)
    elif rows is not None:
      cells = [r.split('|')[1].strip() for r in rows[2:]]  # past the header and the rule
      assert all(re.fullmatch(r'`[^`]+`', c) for c in cells), cells
      tables.append([c.strip('`') for c in cells])
      rows = None
  return tables


def flat(tree) -> dict[str, np.ndarray]:
  """{'params/backbone/conv1_conv/kernel': host array} (dict keys only)."""
  return {
      '/'.join(str(k.key) for k in path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def assert_same_arrays(got: dict, expected: dict) -> None:
  assert sorted(got) == sorted(expected)
  for key, want in expected.items():
    assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
    # Bit for bit: np.array_equal would take -0.0 for 0.0.
    assert np.ascontiguousarray(got[key]).tobytes() == np.ascontiguousarray(want).tobytes(), key


def steps(folder: Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def saved_tree(step_dir: Path) -> dict:
  """The Orbax metadata tree of a step's `state` (shapes and dtypes; None leaves kept)."""
  return ocp.PyTreeCheckpointer().metadata(step_dir / 'state').item_metadata.tree


@pytest.fixture(scope='module')
def best_run(demo_run):
  return restore.load_run(demo_run, 'best')


@pytest.fixture(scope='module')
def export_script():
  spec = importlib.util.spec_from_file_location('export_script', ROOT / 'scripts' / 'export.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- the layout -------------------------------------------------------------------


def test_documented_keys_are_those_of_a_real_checkpoint(demo_run):
  ckpt = Path(demo_run) / 'checkpoints'
  latest, best = ckpt / 'latest' / str(steps(ckpt / 'latest')[-1]), ckpt / 'best'
  best = best / str(steps(best)[-1])
  (state_keys,) = table_keys(section('### `state`: the train state'))
  for step_dir in (latest, best):
    assert sorted(state_keys) == sorted(saved_tree(step_dir))
  base, best_only = table_keys(section('### `meta`: where the run stood'))
  read = lambda step_dir: json.loads((step_dir / 'meta' / 'metadata').read_text())
  assert sorted(read(latest)) == sorted(base)
  assert sorted(read(best)) == sorted(base + best_only)
  assert read(latest)['step'] == int(latest.name) and read(latest)['phase'] == 'finetune'
  dataset_keys = table_keys(section('### `config.json` and `dataset.json`'))[0]
  assert sorted(json.loads((Path(demo_run) / 'dataset.json').read_text())) == sorted(dataset_keys)


def test_tree_excerpt_is_a_real_tree(demo_run):
  """Every line of the excerpt is a leaf of the demo's finetune checkpoint, with its shape
  and dtype, and the counts quoted above it are right."""
  latest = Path(demo_run) / 'checkpoints' / 'latest'
  tree = saved_tree(latest / str(steps(latest)[-1]))
  leaves = {
      path_str(p): None if v is None else (str(tuple(v.shape)), str(v.dtype))
      for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  }
  text = section('### `state`: the train state')
  (excerpt,) = code_blocks(text, 'text')
  lines = [line for line in excerpt.splitlines() if line != '...']
  assert len(lines) > 20
  for line in lines:
    path, rest = line.split(None, 1)
    shape_dtype = re.fullmatch(r'(\(.*\))\s+(\w+)', rest.strip())
    want = None if rest.strip() == 'None' else shape_dtype.groups()
    assert path in leaves, path
    assert leaves[path] == want, (line, leaves[path])
  arrays = {k for k, v in leaves.items() if v is not None}
  counts = re.search(
      r'It holds (\d+) arrays: (\d+) in params, (\d+) in batch_stats, (\d+) in\s+'
      r'opt_state, and the step',
      text,
  )
  assert counts, 'the counts sentence'
  group = lambda g: sum(k.split('/')[0] == g for k in arrays)
  assert [int(n) for n in counts.groups()] == [
      len(arrays),
      group('params'),
      group('batch_stats'),
      group('opt_state'),
  ]


def test_backbone_example_keys_exist():
  rows = [
      line
      for line in section('## Parameter names').splitlines()
      if re.match(r'\| `\w+` \| `(params|batch_stats)/', line)
  ]
  assert len(rows) == 4
  for row in rows:
    backbone, keys = row.split('|')[1:3]
    backbone = backbone.strip().strip('`')
    model_config = config_lib.default_config().model
    model_config.backbone = backbone
    model = models.build_model(model_config, 10)
    size = models.BACKBONES[backbone].input_size
    tree = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.uint8)
    )
    paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}
    for key in re.findall(r'`([^`]+)`', keys):
      assert key in paths, (backbone, key)


# --- the plain-Orbax recipe -----------------------------------------------------------

# Runs the page's recipe once per job in a process where importing fineflax raises, saves
# what it restored, and tries Orbax's restore without restore_args on the last job.
HARNESS = r"""
import importlib.abc, json, os, sys

class NoFineflax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'fineflax':
      raise ImportError(f'{name}: fineflax may not be imported here')
    return None

sys.meta_path.insert(0, NoFineflax())
try:
  import fineflax
except ImportError:
  pass
else:
  raise SystemExit('fineflax could be imported')
import jax
import numpy as np
import orbax.checkpoint as ocp

jobs = json.loads(sys.argv[1])
for code, out, cwd in jobs:
  os.chdir(cwd)  # the recipe's workdir is relative to the folder runs/ is in
  scope = {'__name__': '__recipe__'}
  exec(compile(code, 'docs/checkpoints.md', 'exec'), scope)
  tree = {'params': scope['params'], 'batch_stats': scope['batch_stats']}
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert all(type(leaf) is np.ndarray for _, leaf in leaves)
  np.savez(out, **{'/'.join(str(k.key) for k in path): leaf for path, leaf in leaves})
try:
  ocp.PyTreeCheckpointer().restore(scope['step_dir'] / 'state')
  print('PLAIN RESTORE WORKED')
except ValueError as e:
  print('PLAIN RESTORE FAILED:', str(e).splitlines()[0])
assert not [m for m in sys.modules if m.split('.')[0] == 'fineflax']
print('devices', len(jax.devices()))
"""


def moved_run(demo_run: Path, best_dir: Path, folder: Path) -> Path:
  """A copy of the best checkpoint as if trained on other devices: its whole state
  (restored as NumPy, as the page says) replicated on the upper half of this process's
  devices and saved by fineflax; returns the step folder."""
  tree = saved_tree(best_dir)
  everything = ocp.PyTreeCheckpointer().restore(
      best_dir / 'state',
      args=ocp.args.PyTreeRestore(
          item=tree,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree),
      ),
  )
  devices = jax.devices()[len(jax.devices()) // 2 :]
  assert devices[0].id > 0, 'needs several devices (tests/conftest.py makes 8)'
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state_lib.TrainState(**everything), replicated)
  assert isinstance(state.step, jax.Array) and state.step.sharding == replicated
  for name in ('config.json', 'dataset.json'):
    shutil.copy(demo_run / name, folder / name)
  saver = checkpoints.Checkpoints(RunDir(folder).best, 1)
  saver.save(state, json.loads((best_dir / 'meta' / 'metadata').read_text()))
  saver.close()
  return RunDir(folder).best / best_dir.name


def test_plain_orbax_recipe_restores_without_fineflax(demo_run, best_run, tmp_path):
  """The recipe exactly as printed, run where its relative `runs/demo` path is right, on
  the smoke run (whose best step is not the full demo's: the recipe must find it) and on
  a copy saved from other devices."""
  demo_run = Path(demo_run)
  (code,) = code_blocks(section(RECIPE_HEADING), 'python')[:1]
  assert not re.search(r'checkpoints/\w+/\d+', code), 'the recipe names a step number'
  step = best_run.checkpoint_dir.name
  shutil.copytree(demo_run, tmp_path / 'as_trained' / 'runs' / 'demo')
  (tmp_path / 'moved' / 'runs' / 'demo').mkdir(parents=True)
  moved = moved_run(demo_run, best_run.checkpoint_dir, tmp_path / 'moved' / 'runs' / 'demo')
  assert moved.name == step
  jobs = [
      [code, str(tmp_path / f'{name}.npz'), str(tmp_path / name)]
      for name in ('as_trained', 'moved')
  ]
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'  # one CPU device, id 0: not those `moved` was saved on
  done = subprocess.run(
      [sys.executable, '-c', HARNESS, json.dumps(jobs)],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=180,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  phase = best_run.meta['phase']
  assert (
      done.stdout.count(
          f'step {best_run.step} (phase {phase!r}): resnet_tiny, 70 ' 'parameter arrays, 10 classes'
      )
      == 2
  ), done.stdout
  assert 'devices 1' in done.stdout
  # What the page says of a restore without restore_args on a machine without those devices.
  assert (
      'PLAIN RESTORE FAILED: sharding passed to deserialization should be specified' in done.stdout
  ), done.stdout
  expected = flat(best_run.variables)
  assert len(expected) == 104
  for name in ('as_trained', 'moved'):
    with np.load(tmp_path / f'{name}.npz') as restored:
      assert_same_arrays({k: restored[k] for k in restored.files}, expected)


# --- scripts/export.py ------------------------------------------------------------------


def test_export_npz_and_safetensors(
    demo_run, best_run, export_script, tmp_path, monkeypatch, capsys
):
  demo_run = Path(demo_run)
  assert export_script.main(['--workdir', str(demo_run), '--out', str(tmp_path / 'demo.npz')]) == 0
  assert 'wrote' in capsys.readouterr().out
  # The command line itself, once, as the page shows it.
  env = helpers.program_env()
  done = subprocess.run(
      [
          sys.executable,
          'scripts/export.py',
          '--workdir',
          str(demo_run),
          '--out',
          str(tmp_path / 'demo.safetensors'),
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=180,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'(step {best_run.step}, best)' in done.stdout
  assert sorted(p.name for p in tmp_path.iterdir()) == ['demo.npz', 'demo.safetensors']

  # The page's reading code, as written, on these files.
  (code,) = code_blocks(section('## Export'), 'python')
  monkeypatch.chdir(tmp_path)
  scope = {'__name__': '__export_doc__'}
  exec(compile(code, 'docs/checkpoints.md', 'exec'), scope)  # pylint: disable=exec-used
  expected = flat(best_run.variables)
  assert_same_arrays(scope['npz_arrays'], expected)
  assert_same_arrays(scope['st_arrays'], expected)
  info = scope['npz_info']
  assert info == scope['st_info']
  assert info['format'] == 'fineflax-export-1'
  assert info['step'] == best_run.step and info['checkpoint'] == 'best'
  assert info['checkpoint_dir'] == str(best_run.checkpoint_dir)
  assert info['class_names'] == list(best_run.class_names) == [str(i) for i in range(10)]
  assert info['image_shape'] == list(best_run.image_shape)
  assert info['meta'] == best_run.meta and info['meta']['monitor'] == 'val_loss'
  assert info['config'] == json.loads((demo_run / 'config.json').read_text())


def test_export_of_a_step(demo_run, export_script, tmp_path):
  out = tmp_path / 'first.npz'
  first = steps(Path(demo_run) / 'checkpoints' / 'latest')[0]
  assert (
      export_script.main(
          ['--workdir', str(demo_run), '--checkpoint', str(first), '--out', str(out)]
      )
      == 0
  )
  with np.load(out) as f:
    arrays = {k: f[k] for k in f.files if k != export_script.NPZ_METADATA_KEY}
    info = json.loads(f[export_script.NPZ_METADATA_KEY].item())
  assert info['step'] == first and info['checkpoint'] == f'step{first}'
  assert_same_arrays(arrays, flat(restore.load_run(demo_run, first).variables))


def test_export_errors(demo_run, export_script, tmp_path, capsys):
  def run(*args: str) -> str:
    assert export_script.main(['--workdir', str(args[0]), '--out', str(args[1]), *args[2:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err and err.count('\n') == 1
    return err

  assert 'unknown format' in run(demo_run, tmp_path / 'weights.pt')
  existing = tmp_path / 'old.npz'
  existing.write_bytes(b'keep me')
  assert '--overwrite' in run(demo_run, existing)
  assert existing.read_bytes() == b'keep me'
  (tmp_path / 'not_a_run').mkdir()
  assert 'is not a fineflax run' in run(tmp_path / 'not_a_run', tmp_path / 'x.npz')
  assert 'no such run directory' in run(tmp_path / 'missing', tmp_path / 'x.npz')
  assert 'has no step 99 (no folder latest/99 or best/99); its steps: best/ ' in run(
      demo_run, tmp_path / 'x.npz', '--checkpoint', '99'
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ['not_a_run', 'old.npz']
  # --overwrite replaces it.
  assert (
      export_script.main(['--workdir', str(demo_run), '--out', str(existing), '--overwrite']) == 0
  )
  with np.load(existing) as f:
    assert 'params/head/dense/kernel' in f.files
