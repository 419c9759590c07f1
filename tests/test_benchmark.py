"""scripts/benchmark.py runs; the head-mode step leaves frozen leaves out of the update;
the compiled steps cost what freezing promises (XLA's FLOP and memory analyses of
ResNet50 at 224 px); --max-batch finds the largest batch that fits; the benchmark needs
none of TensorFlow, scikit-learn, PIL or matplotlib. No test here asserts a speed."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, models, pytree
from fineflax.distributed import parallel
from fineflax.train import freeze, optimizers, state as state_lib, step as step_lib
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts scripts/benchmark.py and compiles ResNet50's steps


def _load_script():
  """scripts/benchmark.py as a module (scripts/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      'fineflax_benchmark_script', ROOT / 'scripts' / 'benchmark.py'
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it executes
  spec.loader.exec_module(module)
  return module


benchmark = _load_script()


def _benchmark(*args):
  env = helpers.program_env()
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  return lines, result.stdout


def test_benchmark_prints_a_json_line_per_mode_and_a_table():
  records, out = _benchmark(
      '--backbone', 'resnet_tiny', '--batch', '8', '--image', '16', '--windows', '2', '--steps', '2'
  )
  assert [r['mode'] for r in records] == ['forward', 'head', 'conv5', 'full']
  for r in records:
    assert r['what'] == 'step' and r['batch'] == 8 and r['platform'] == 'cpu'
    assert r['img_per_s'] > 0 and len(r['window_img_per_s']) == 2 and r['compile_s'] > 0
  # head < conv5 < full in what trains; forward trains nothing.
  assert [r['trainable_leaves'] for r in records][0] == 0
  assert (
      records[1]['trainable_leaves']
      < records[2]['trainable_leaves']
      < records[3]['trainable_leaves']
  )
  assert '| step | resnet_tiny | conv5 | 8 | 16 | float32 |' in out


def test_benchmark_loop_runs_the_training_loop():
  records, _ = _benchmark(
      '--loop',
      '--backbone',
      'resnet_tiny',
      '--batch',
      '8',
      '--image',
      '16',
      '--data',
      'synthetic:24:8',
      '--modes',
      'head',
      '--epochs',
      '2',
  )
  assert len(records) == 1
  assert records[0]['what'] == 'loop' and records[0]['img_per_s'] > 0


def test_help_is_the_whole_description_and_a_cpu_run_has_no_backend_notice():
  """`--help` ends no sentence midway; on a machine without a TPU, JAX's INFO line about
  the TPU backend it could not start is not printed (JAX_PLATFORMS left unset, as a user
  leaves it)."""
  env = helpers.program_env(unset=('JAX_PLATFORMS',))
  shown = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', '--help'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert shown.returncode == 0, shown.stderr[-3000:]
  description = shown.stdout[shown.stdout.index('\n\n') + 2 : shown.stdout.index('options:')]
  assert description == benchmark.__doc__ + '\n'
  assert 'how large a batch fits, without running it.' in description
  assert '--image 224 \\\n        --data synthetic:50000:32' in description
  done = subprocess.run(
      [
          sys.executable,
          'scripts/benchmark.py',
          '--cost',
          '--backbone',
          'resnet_tiny',
          '--batch',
          '2',
          '--image',
          '16',
          '--modes',
          'head',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'devices: backend cpu' in done.stderr  # fineflax's own lines stay
  assert 'Unable to initialize backend' not in done.stderr, done.stderr


@pytest.mark.parametrize('spec', ['backbone', 'layers[:43]'])
def test_a_step_hands_over_only_what_it_changes(spec):
  """The step's call takes and returns the carry (step count, trainable parameters,
  optimizer state); frozen parameters and BatchNorm statistics go in apart, neither
  donated nor returned, so no operation can touch them: after a step the state holds the
  very same arrays for them, and new ones for every trainable parameter. The optimizer
  holds trainable leaves only."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  model = models.build_model(cfg.model, 4)
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  optimizer = optimizers.make_optimizer(
      model, variables['params'], config_lib.phase(freeze=spec), 1
  )
  labels = optimizer.labels
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = parallel.replicate(state_lib.create_train_state(variables, optimizer), mesh)
  batch = parallel.shard_batch(
      {
          'image': np.zeros((4, 16, 16, 3), np.uint8),
          'label': np.zeros(4, np.int32),
          'weight': np.ones(4, np.float32),
      },
      mesh,
  )
  train_step = step_lib.make_train_step(model, optimizer, mesh)
  carry, fixed, structure = train_step.split(state)
  params = {
      pytree.path_str(p): label for p, label in jax.tree_util.tree_flatten_with_path(labels)[0]
  }
  frozen = {p for p, label in params.items() if label == freeze.FROZEN}
  trainable = set(params) - frozen
  paths = lambda tree: {
      pytree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  carried, kept = structure[0].unflatten(carry), structure[1].unflatten(fixed)
  assert frozen and paths(carried['params']) == trainable
  assert paths(kept['params']) == frozen
  assert paths(kept['batch_stats']) == paths(state.batch_stats) and 'batch_stats' not in carried
  # The compiled call returns the carry and the metrics, nothing else.
  data = {'start': jnp.zeros((), jnp.int32)}
  metrics = jnp.zeros((1, 3), jnp.float32)
  traced = jax.make_jaxpr(train_step.jitted, static_argnums=5)(
      carry, fixed, batch, data, metrics, structure
  )
  assert len(traced.out_avals) == len(carry) + 1
  before = {
      pytree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.variables)[0]
  }
  after, _ = train_step(state, batch)
  for path, x in jax.tree_util.tree_flatten_with_path(after.variables)[0]:
    name = pytree.path_str(path)
    if name.removeprefix('params/') in frozen or name.startswith('batch_stats/'):
      assert x is before[name], name
    else:
      assert x is not before[name], name
  adam_moments = [x for x in jax.tree.leaves(after.opt_state) if x.ndim > 0]
  assert len(adam_moments) == 2 * len(trainable)


@pytest.fixture(scope='module')
def resnet50_costs():
  """The four modes of ResNet50 at 224 px, batch 8, float32, compiled once on one device
  (the conftest's 8 virtual devices would give each device one image, where the
  optimizer's per-step FLOPs no longer vanish next to the per-image ones)."""
  records = benchmark.cost_records(
      'resnet50', list(benchmark.MODES), 8, 224, 'float32', devices=jax.devices()[:1]
  )
  return {r['mode']: r for r in records}


def _conv5_stage_gflop_per_image(batch=8, image=224):
  """XLA's FLOPs of ResNet50's conv5 stage alone (layers from conv5_block1_1_conv on,
  inference-mode BatchNorm), on conv4_block6_out's shape, per image."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet50'
  backbone = models.build_model(cfg.model, 10).backbone
  names = [layer.name for layer in backbone.layers]
  start = names.index('conv5_block1_1_conv')
  assert names[start - 1] == 'conv4_block6_out' and names[-1] == 'conv5_block3_out'
  x = jax.ShapeDtypeStruct((batch, image, image, 3), jnp.float32)
  variables = jax.eval_shape(backbone.init, jax.random.key(0), x)
  conv4 = jax.eval_shape(lambda v, x: backbone.apply(v, x, stop=start), variables, x)
  assert conv4.shape == (batch, image // 16, image // 16, 1024)
  stage = jax.jit(lambda v, x: backbone.apply(v, x, start=start))
  out = jax.eval_shape(lambda v, x: backbone.apply(v, x, start=start), variables, conv4)
  assert out.shape == (batch, image // 32, image // 32, 2048)
  return benchmark.flops(stage.lower(variables, conv4).compile()) / batch / 1e9


def test_cost_records_describe_every_mode(resnet50_costs):
  assert list(resnet50_costs) == list(benchmark.MODES)
  for r in resnet50_costs.values():
    assert r['what'] == 'cost' and r['batch'] == 8 and r['image'] == 224
    assert r['dtype'] == 'float32' and r['devices'] == 1 and r['platform'] == 'cpu'
    assert r['gflop_per_image'] > 0 and r['temp_mb'] > 0 and r['argument_mb'] > 0
  assert resnet50_costs['forward']['x_forward'] == 1.0
  # Keras' ResNet50 is ~3.9 G multiply-adds at 224 px: ~7.7 GFLOP.
  assert 7.0 < resnet50_costs['forward']['gflop_per_image'] < 8.5


def test_head_mode_costs_the_flops_of_the_forward_pass(resnet50_costs):
  # The frozen backbone is not differentiated: only the head's tiny backward remains.
  assert resnet50_costs['head']['x_forward'] <= 1.02


def test_head_mode_needs_the_temporary_memory_of_the_forward_pass(resnet50_costs):
  # No backbone activation is kept for a backward pass.
  assert resnet50_costs['head']['temp_mb'] <= 1.05 * resnet50_costs['forward']['temp_mb']


def test_full_mode_costs_three_forward_passes(resnet50_costs):
  # The backward pass is two forwards' worth: gradients for the inputs and the weights.
  assert 2.9 <= resnet50_costs['full']['x_forward'] <= 3.1


def test_conv5_mode_differentiates_only_the_conv5_stage(resnet50_costs):
  forward = resnet50_costs['forward']['gflop_per_image']
  conv5 = resnet50_costs['conv5']['gflop_per_image']
  stage = _conv5_stage_gflop_per_image()
  assert 0.1 * forward < stage < 0.25 * forward  # the stage is ~1/6 of ResNet50
  # It trains: the stage's weight gradients alone cost its forward pass again; its input
  # gradients (all but the first layer's) nearly as much; nothing before it is touched.
  assert forward + stage <= conv5 <= forward + 2 * stage + 0.02 * forward


def test_max_batch_fits_and_freezing_buys_batch():
  budget_gib = 0.05
  one = jax.devices()[:1]
  records = {
      r['mode']: r
      for r in benchmark.cost_records(
          'resnet_tiny', ['head', 'full'], 8, 16, 'float32', max_batch_gib=budget_gib, devices=one
      )
  }
  head, full = records['head']['max_batch'], records['full']['max_batch']
  assert head >= full > 8
  built = benchmark.build_step('resnet_tiny', 'full', 8, 16, 'float32', devices=one)

  def needs(batch):  # what XLA says the step needs, recomputed here independently
    m = built.compile(batch).memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )

  budget = budget_gib * 2**30
  assert needs(full) <= budget < needs(full + 1)
  assert needs(int(full * 1.25)) > budget


_BLOCKED = ('tensorflow', 'tensorflow_datasets', 'sklearn', 'PIL', 'matplotlib')
_RUN_BLOCKED = textwrap.dedent(f"""
    import runpy, sys

    class Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {_BLOCKED!r}:
          raise ImportError(f'{{name}} is not installed on a bare accelerator machine')
        return None

    sys.meta_path.insert(0, Blocked())
    sys.argv = ['scripts/benchmark.py'] + sys.argv[1:]
    runpy.run_path('scripts/benchmark.py', run_name='__main__')
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in {_BLOCKED!r})
    assert not loaded, loaded
""")


def test_cost_and_max_batch_run_without_tensorflow_sklearn_pil_or_matplotlib(tmp_path):
  env = helpers.program_env(
      cache=tmp_path / 'cache',
      JAX_PLATFORMS='cpu',
      HOME=str(tmp_path / 'home'),
      XDG_CACHE_HOME=str(tmp_path / 'xdg'),
  )
  result = subprocess.run(
      [
          sys.executable,
          '-c',
          _RUN_BLOCKED,
          '--cost',
          '--backbone',
          'resnet_tiny',
          '--image',
          '16',
          '--batch',
          '8',
          '--max-batch',
          '0.05',
          '--modes',
          'head',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert [r['mode'] for r in records] == ['head']
  assert records[0]['what'] == 'cost' and records[0]['max_batch'] > 8
  assert '| resnet_tiny | head | 8 | 16 | float32 | 1 cpu |' in result.stdout
  assert 'devices: backend cpu' in result.stderr  # runtime.check_backend's log line


@pytest.mark.parametrize('error', ['ConfigError', 'AcceleratorUnusedError'])
def test_a_failed_backend_check_exits_with_its_message(monkeypatch, capsys, error):
  from fineflax import errors  # pylint: disable=g-import-not-at-top
  from fineflax.distributed import runtime

  kind = getattr(errors, error, None) or getattr(runtime, error)

  def check_backend():
    raise kind('this machine has a GPU but JAX runs on the CPU')

  monkeypatch.setattr(benchmark.runtime, 'check_backend', check_backend)
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(['--cost', '--backbone', 'resnet_tiny'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.endswith('error: this machine has a GPU but JAX runs on the CPU\n')
