"""scripts/benchmark.py runs; the head-mode step leaves frozen leaves out of the update;
bfloat16 compute stays close to float32. No test here asserts a speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, freeze, models, optimizers, parallel
from fineflax import state as state_lib, step as step_lib

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(*args):
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, 'scripts/benchmark.py', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  return lines, result.stdout


def test_benchmark_prints_a_json_line_per_mode_and_a_table():
  records, out = _benchmark('--backbone', 'resnet_tiny', '--batch', '8', '--image', '16',
                            '--windows', '2', '--steps', '2')
  assert [r['mode'] for r in records] == ['forward', 'head', 'conv5', 'full']
  for r in records:
    assert r['what'] == 'step' and r['batch'] == 8 and r['platform'] == 'cpu'
    assert r['img_per_s'] > 0 and len(r['window_img_per_s']) == 2 and r['compile_s'] > 0
  # head < conv5 < full in what trains; forward trains nothing.
  assert [r['trainable_leaves'] for r in records][0] == 0
  assert records[1]['trainable_leaves'] < records[2]['trainable_leaves'] < \
      records[3]['trainable_leaves']
  assert '| step | resnet_tiny | conv5 | 8 | 16 | float32 |' in out


def test_benchmark_loop_runs_the_training_loop():
  records, _ = _benchmark('--loop', '--backbone', 'resnet_tiny', '--batch', '8', '--image',
                          '16', '--data', 'synthetic:24:8', '--modes', 'head', '--epochs', '2')
  assert len(records) == 1
  assert records[0]['what'] == 'loop' and records[0]['img_per_s'] > 0


def _passed_through(closed_jaxpr, num_outputs):
  """Indices i of the step's outputs that are its input i itself, untouched by any
  operation: traced through the jit and into the per-device shard_map body."""
  jitted = closed_jaxpr.jaxpr.eqns[0].params['jaxpr'].jaxpr
  (mapped,) = [e for e in jitted.eqns if e.primitive.name == 'shard_map']
  body = mapped.params['jaxpr']
  position = {id(v): k for k, v in enumerate(jitted.invars)}
  passed = set()
  for i in range(num_outputs):
    out = body.outvars[i]
    for k, var in enumerate(body.invars):
      # Body input k is the shard_map's operand k, a variable of the jitted function.
      if out is var and position.get(id(mapped.invars[k])) == i:
        passed.add(i)
  return passed


@pytest.mark.parametrize('spec', ['backbone', 'layers[:43]'])
def test_frozen_leaves_pass_through_the_step_untouched(spec):
  """In the traced step, every frozen parameter's output is its input variable itself (no
  operation touches it, not even an added zero) and every trainable one is computed."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  model = models.build_model(cfg.model, 4)
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  labels = freeze.freeze_labels(variables['params'], spec, model.backbone.layers)
  tx = freeze.partition_optimizer(optimizers.build_optimizer(config_lib.phase(), 1).tx, labels)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = parallel.replicate(state_lib.create_train_state(variables, tx, labels), mesh)
  batch = parallel.shard_batch({'image': np.zeros((4, 16, 16, 3), np.uint8),
                                'label': np.zeros(4, np.int32),
                                'weight': np.ones(4, np.float32)}, mesh)
  train_step = step_lib.make_train_step(model, tx, labels, mesh)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  through = _passed_through(jax.make_jaxpr(train_step)(state, batch, {}), len(leaves))
  passed = {freeze.path_str(leaves[i][0]) for i in through}
  params = {'params/' + freeze.path_str(p): label
            for p, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  frozen = {p for p, label in params.items() if label == freeze.FROZEN}
  assert frozen and frozen <= passed
  assert not passed & {p for p, label in params.items() if label == freeze.TRAINABLE}
  # Frozen BN statistics pass through as well; the optimizer holds trainable leaves only.
  stats = {p for p in passed if p.startswith('batch_stats/')}
  assert len(stats) == len(jax.tree.leaves(state.batch_stats))
  trainable = sum(label == freeze.TRAINABLE for label in params.values())
  adam_moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert len(adam_moments) == 2 * trainable


def test_bfloat16_loss_stays_close_to_float32():
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  targets = rng.integers(0, 4, 16).astype(np.int32)
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.build_model(cfg.model, 4, dtype=dtype)
    variables = state_lib.init_variables(model, (32, 32, 3), seed=0)
    logits = model.apply(variables, images)
    assert logits.dtype == jnp.float32  # the classifier computes in float32 always
    losses[dtype] = float(np.mean(step_lib.per_example_loss(logits, targets)[0]))
  # bfloat16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%); through a dozen
  # layers the rounding errors add up to a few of those steps, so 2% bounds them.
  assert losses[jnp.bfloat16] != losses[jnp.float32]  # the bf16 path is really taken
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)
