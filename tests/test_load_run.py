"""A run from Python: fineflax.load_run and fineflax.predict_fn, in a fresh process
(docs/checkpoints.md), and what load_run says of a step the run does not have."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import fineflax
from fineflax import data, models
from fineflax.errors import ConfigError
from fineflax.inference import evaluate, predict
from fineflax.run import restore
from tests import helpers
from tests.test_checkpoint_layout import moved_run

pytestmark = pytest.mark.slow  # trains a run and opens it in a program of its own

# The same rows through other batch sizes and device counts: float32 rounding only.
PROB_ATOL = 1e-6

_FRESH_PROCESS = """
import json, sys
import jax
import numpy as np
import fineflax
from fineflax import data
run = fineflax.load_run(sys.argv[1])
split = data.load_dataset(run.config.data).splits[run.config.data.test_split]
probs = fineflax.predict_fn(run)(split.images)
np.savez(sys.argv[2], probabilities=np.asarray(probs), labels=split.labels)
# The same checkpoint as saved from devices 4-7, which this process does not have.
moved = fineflax.load_run(sys.argv[3])
same = all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in
           zip(jax.tree.leaves(run.variables), jax.tree.leaves(moved.variables), strict=True))
print(json.dumps({'step': run.step, 'label': run.label, 'classes': list(run.class_names),
                  'device': str(probs.device.platform), 'devices': jax.device_count(),
                  'moved_run_equal': same}))
"""


@pytest.fixture(scope='module')
def run_copy(demo_run, tmp_path_factory):
  return Path(shutil.copytree(demo_run, tmp_path_factory.mktemp('load_run') / 'run'))


def test_load_run_in_a_fresh_process_predicts_what_evaluate_computed(run_copy, tmp_path):
  report = evaluate.evaluate_run(run_copy, 'test', devices=jax.devices()[:2])
  evaluated = np.load(report['files']['predictions'])
  out = tmp_path / 'fresh.npz'
  best = fineflax.load_run(run_copy).checkpoint_dir
  (tmp_path / 'moved').mkdir()
  moved_run(run_copy, best, tmp_path / 'moved')  # as if trained on another machine
  # One CPU device and nothing inherited: as in a notebook on a laptop.
  env = helpers.program_env(JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-c', _FRESH_PROCESS, str(run_copy), str(out), str(tmp_path / 'moved')],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  opened = json.loads(result.stdout.strip().splitlines()[-1])
  assert opened == {
      'step': report['step'],
      'label': 'best',
      'classes': [str(d) for d in range(10)],
      'device': 'cpu',
      'devices': 1,
      'moved_run_equal': True,
  }
  fresh = np.load(out)
  np.testing.assert_array_equal(fresh['labels'], evaluated['labels'])
  np.testing.assert_allclose(
      fresh['probabilities'], evaluated['probabilities'], rtol=0, atol=PROB_ATOL
  )
  np.testing.assert_array_equal(fresh['probabilities'].argmax(-1), evaluated['predicted'])
  assert len(fresh['labels']) == report['examples']


def test_predict_fn_takes_one_image_and_any_size(run_copy, tmp_path):
  run = fineflax.load_run(run_copy)
  predict_probs = fineflax.predict_fn(run)
  split = data.load_dataset(run.config.data).splits[run.config.data.test_split]
  images = split.images[:6]
  batch = np.asarray(predict_probs(images))
  assert batch.shape == (6, 10) and np.allclose(batch.sum(-1), 1, atol=1e-5)
  np.testing.assert_allclose(np.asarray(predict_probs(images[2])), batch[2], atol=PROB_ATOL)

  # Larger images are resized to the stored 8x8 on the device (bilinear, antialiased);
  # the command line resizes the files with PIL: up to uint8 rounding, the same input
  # (probabilities within 1e-4 of each other when measured; 1e-3 allowed).
  big = [
      np.asarray(Image.fromarray(im).resize((20, 20), Image.Resampling.NEAREST)) for im in images
  ]
  paths = []
  for i, im in enumerate(big):
    paths.append(tmp_path / f'{i}.png')
    Image.fromarray(im).save(paths[-1])
  on_device = np.asarray(predict_probs(np.stack(big)))
  from_files = predict.predict_run_files(
      run_copy, [str(p) for p in paths], k=10, devices=jax.devices()[:1]
  )
  for row, top in zip(on_device, from_files):
    expected = np.zeros(10)
    for name, p in top:
      expected[int(name)] = p
    np.testing.assert_allclose(row, expected, atol=1e-3)

  with pytest.raises(ValueError, match=r'shape \(8, 8\) and dtype uint8: expected uint8 RGB'):
    predict_probs(images[0, :, :, 0])
  with pytest.raises(ValueError, match='dtype float32'):
    predict_probs(images.astype(np.float32))


def test_a_step_the_run_does_not_have_is_named_with_the_steps_it_has(run_copy):
  """A step number copied from an example (the full demo's, not this run's): one line
  naming the folder that is missing and the steps that exist, from load_run and from
  read_variables given the step folder itself."""
  folder = run_copy / 'checkpoints'
  best = sorted(int(p.name) for p in (folder / 'best').iterdir() if p.name.isdigit())
  with pytest.raises(ConfigError) as error:
    fineflax.load_run(run_copy, 36)
  assert str(error.value) == (
      f'{folder} has no step 36 (no folder latest/36 or best/36); '
      f'its steps: best/ {best}, latest/ [2, 4]'
  )
  run = fineflax.load_run(run_copy)
  expected = models.abstract_variables(run.model, run.image_shape)
  with pytest.raises(ConfigError) as error:
    restore.read_variables(folder / 'best' / '36', expected)
  assert str(error.value) == (
      f'{folder / "best" / "36"}: no such checkpoint folder; the steps '
      f'in {folder / "best"}: {best[0]}'
  )
  with pytest.raises(ConfigError, match=r'/checkpoints/phase_best does not exist\)$'):
    restore.read_variables(folder / 'phase_best' / '36', expected)
  with pytest.raises(ConfigError, match='not a checkpoint step folder \\(it has no state/\\)$'):
    restore.read_variables(folder / 'best', expected)
