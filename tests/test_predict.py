"""`python -m fineflax.predict` and `fineflax.predict_fn` as a newcomer uses them: a broken
file among good ones, no readable file at all, a folder of images, --output .csv / .json,
the checkpoint named at the top, and predict_fn given a list of images of different sizes.

The programs run in a subprocess, as the user ran them, on conftest's `demo_run` (the demo
smoke config: checkpoints at steps 2 and 4, one in best/), which they only read.
"""

import csv
import importlib
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import fineflax
from fineflax import data
from fineflax.cli import predict as cli_predict
from fineflax.errors import ConfigError, DataError
from fineflax.inference import predict
from fineflax.run import restore
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains the demo run and starts the predict program

# The same rows through another batch (float32 rounding only).
PROB_ATOL = 1e-6
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope='module')
def test_images(demo_run):
  """The first test digits of the run's dataset, (n, 8, 8, 3) uint8."""
  config = restore.read_config(demo_run)
  return data.load_dataset(config.data).splits[config.data.test_split].images[:8]


@pytest.fixture(scope='module')
def walkthrough(test_images, tmp_path_factory):
  """The newcomer's files: good PNGs, a broken JPEG, a missing file, and a folder with
  images (one upper-case suffix, one at another size), a text file and a sub-folder."""
  root = tmp_path_factory.mktemp('walkthrough')
  Image.fromarray(test_images[0]).save(root / 'a.png')
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  Image.fromarray(test_images[1]).save(root / 'c.png')
  folder = root / 'digits'
  folder.mkdir()
  Image.fromarray(test_images[3]).save(folder / '3.png')
  Image.fromarray(test_images[2]).resize((16, 12)).save(folder / '2.JPG')
  (folder / 'notes.txt').write_text('not an image')
  (folder / 'nested').mkdir()
  Image.fromarray(test_images[4]).save(folder / 'nested' / '4.png')
  (root / 'empty').mkdir()
  return root


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """One $FINEFLAX_CACHE for the module's programs: they share compiled steps."""
  return tmp_path_factory.mktemp('cache')


def _predict(args, cache, cwd):
  env = helpers.program_env(cache=cache)
  return subprocess.run(
      [sys.executable, '-m', 'fineflax.predict', *map(str, args)],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


def _best_step(run_dir):
  return int(restore.find_checkpoint(run_dir, 'best')[0].name)


def _printed(stdout):
  """{path: [(class, probability), ...]} of the lines after the checkpoint line."""
  rows = {}
  for line in stdout.splitlines()[1:]:
    path, ranked = line.rsplit(': ', 1)
    rows[path] = [(name, float(p)) for name, p in (part.split() for part in ranked.split(', '))]
  return rows


def test_a_broken_file_does_not_stop_the_others(demo_run, walkthrough, cache, tmp_path):
  # As the newcomer ran it, from the folder of the images, with relative paths.
  out = tmp_path / 'out.csv'
  done = _predict(
      [
          '--workdir',
          demo_run,
          '--top_k',
          2,
          '--output',
          out,
          'a.png',
          'broken.jpg',
          'missing.png',
          'digits',
          'c.png',
      ],
      cache,
      walkthrough,
  )
  assert done.returncode == 1, done.stderr[-3000:]
  step = _best_step(demo_run)
  lines = done.stdout.splitlines()
  assert lines[0] == f'{demo_run}: checkpoint best (step {step})'
  # The folder is its images, sorted; not the text file, not the sub-folder.
  good = ['a.png', 'digits/2.JPG', 'digits/3.png', 'c.png']
  printed = _printed(done.stdout)
  assert list(printed) == good
  for ranked in printed.values():
    assert len(ranked) == 2 and {name for name, _ in ranked} <= set(DIGITS)
    assert ranked[0][1] >= ranked[1][1] > 0
  errors = done.stderr.splitlines()
  assert any(line.startswith('broken.jpg: not a readable image (') for line in errors)
  assert any(line.startswith('missing.png: not a readable image (') for line in errors)
  assert errors[-1] == 'error: 2 of 6 images could not be read: broken.jpg, missing.png'
  assert 'Traceback' not in done.stderr

  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['path'] for r in rows] == ['a.png', 'broken.jpg', 'missing.png', *good[1:]]
  assert list(rows[0]) == [
      'path',
      'workdir',
      'checkpoint',
      'step',
      'weights',
      'class_1',
      'probability_1',
      'class_2',
      'probability_2',
      'error',
  ]
  for row in rows:
    assert (row['workdir'], row['checkpoint'], row['step'], row['weights']) == (
        str(demo_run),
        'best',
        str(step),
        '',
    )
    if row['path'] in good:
      assert row['error'] == ''
      ranked = printed[row['path']]
      assert [row['class_1'], row['class_2']] == [name for name, _ in ranked]
      assert [float(row['probability_1']), float(row['probability_2'])] == pytest.approx(
          [p for _, p in ranked], abs=5e-5
      )  # printed to 4 decimals
    else:
      assert row['error'].startswith(f"{row['path']}: not a readable image (")
      assert row['class_1'] == row['probability_1'] == ''

  # The good images get what they get when every file is readable.
  before = predict.predict_run_files(
      demo_run, [str(walkthrough / p) for p in good], k=2, devices=jax.devices()[:1]
  )
  for path, ranked in zip(good, before):
    row = next(r for r in rows if r['path'] == path)
    assert [row['class_1'], row['class_2']] == [name for name, _ in ranked]
    assert float(row['probability_1']) == pytest.approx(ranked[0][1], abs=1e-6)


def test_json_output_and_exit_status_0(demo_run, walkthrough, cache, tmp_path):
  out = tmp_path / 'out.json'
  done = _predict(
      [
          '--workdir',
          demo_run,
          '--checkpoint',
          'latest',
          '--top_k',
          3,
          '--output',
          out,
          walkthrough / 'digits',
      ],
      cache,
      tmp_path,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert lines[0] == f'{demo_run}: checkpoint latest (step 4)'
  paths = [str(walkthrough / 'digits' / name) for name in ('2.JPG', '3.png')]
  assert [line.rsplit(': ', 1)[0] for line in lines[1:]] == paths
  rows = json.loads(out.read_text())
  assert [r['path'] for r in rows] == paths
  for row in rows:
    assert (row['workdir'], row['checkpoint'], row['step'], row['weights'], row['error']) == (
        str(demo_run),
        'latest',
        4,
        None,
        None,
    )
    assert [set(entry) for entry in row['top_k']] == [{'class', 'probability'}] * 3
    probs = [entry['probability'] for entry in row['top_k']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_no_readable_file_and_a_wrong_output_suffix(demo_run, walkthrough, cache, tmp_path):
  out = tmp_path / 'none.json'
  done = _predict(
      ['--workdir', demo_run, '--output', out, 'broken.jpg', 'missing.png', 'empty'],
      cache,
      walkthrough,
  )
  assert done.returncode == 1 and done.stdout == ''
  errors = done.stderr.splitlines()
  assert errors[-1] == 'error: none of the 3 images could be read'
  assert any(line.startswith('broken.jpg: not a readable image (') for line in errors)
  assert 'empty: a folder without image files (.jpg, .jpeg, .png, .bmp, .gif)' in errors
  assert 'Traceback' not in done.stderr
  # --output has every file with its error all the same (no checkpoint was opened).
  rows = json.loads(out.read_text())
  assert [r['path'] for r in rows] == ['broken.jpg', 'missing.png', 'empty']
  assert [r['error'] for r in rows] == errors[-4:-1]
  for row in rows:
    assert (row['workdir'], row['checkpoint'], row['step'], row['top_k']) == (
        str(demo_run),
        None,
        None,
        None,
    )

  done = _predict(['--workdir', demo_run, '--output', 'out.txt', 'a.png'], cache, walkthrough)
  assert done.returncode == 1 and done.stdout == ''
  assert done.stderr.splitlines()[-1] == (
      "error: --output out.txt: expected a .csv or .json file, not '.txt'"
  )
  assert not (walkthrough / 'out.txt').exists() and 'Traceback' not in done.stderr


def test_the_program_prints_the_run_s_classes(demo_run, walkthrough, capsys):
  paths = [str(walkthrough / name) for name in ('a.png', 'c.png', 'digits/2.JPG')]
  every = predict.predict_run_files(
      demo_run, paths, k=10, checkpoint='latest', devices=jax.devices()[:1]
  )
  assert len(every) == len(paths)
  for ranked in every:
    assert sorted(name for name, _ in ranked) == DIGITS
    probs = [p for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)

  cli_predict.predict(None, paths, 2, workdir=str(demo_run))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f'{demo_run}: checkpoint best (step {_best_step(demo_run)})'
  assert [line.rsplit(': ', 1)[0] for line in lines[1:]] == paths
  for line in lines[1:]:
    (first, p1), (second, p2) = [part.split() for part in line.rsplit(': ', 1)[1].split(', ')]
    assert {first, second} <= set(DIGITS) and first != second
    assert float(p1) >= float(p2) > 0
  with pytest.raises(ConfigError, match='exactly one of --config'):
    cli_predict.predict(None, paths, 2)
  # From Python the strict helper still stops at a bad file, naming it.
  with pytest.raises(DataError, match=r'broken\.jpg: not a readable image'):
    predict.predict_run_files(demo_run, [paths[0], str(walkthrough / 'broken.jpg')])


def test_zero_shot_output_names_the_config_s_weights(walkthrough, tmp_path, capsys):
  sys.path.insert(0, str(ROOT))
  config = importlib.import_module('configs.demo').get_config('smoke')
  config.model.weights = None  # random weights: the demo has no pretrained file
  out = tmp_path / 'zero_shot.json'
  paths = [str(walkthrough / 'a.png'), str(walkthrough / 'broken.jpg')]
  with pytest.raises(DataError, match=r'^1 of 2 images could not be read: .*broken\.jpg$'):
    cli_predict.predict(config, paths, 1, output=str(out))
  captured = capsys.readouterr()
  lines = captured.out.splitlines()
  assert lines[0] == 'zero-shot: resnet_tiny with random weights (config.model.weights is None)'
  assert [line.rsplit(': ', 1)[0] for line in lines[1:]] == paths[:1]
  assert f'{paths[1]}: not a readable image (' in captured.err
  rows = json.loads(out.read_text())
  assert [(r['path'], r['workdir'], r['checkpoint'], r['step'], r['weights']) for r in rows] == [
      (p, None, None, None, None) for p in paths
  ]
  assert rows[1]['top_k'] is None and rows[1]['error'].startswith(f'{paths[1]}: not a readable')
  assert len(rows[0]['top_k']) == 1 and rows[0]['error'] is None


def test_predict_fn_takes_a_list_of_images_of_different_sizes(demo_run, test_images):
  run = fineflax.load_run(demo_run)
  probs_of = fineflax.predict_fn(run)
  sizes = [(8, 8), (20, 20), (12, 16), (5, 7), (20, 20)]
  images = [
      np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.NEAREST))
      for im, (h, w) in zip(test_images, sizes)
  ]
  listed = np.asarray(probs_of(images))
  assert listed.shape == (5, 10) and np.allclose(listed.sum(-1), 1, atol=1e-5)
  # Each image as the array path resizes it, alone.
  for image, row in zip(images, listed):
    np.testing.assert_allclose(row, np.asarray(probs_of(image)), rtol=0, atol=PROB_ATOL)
  # A tuple, and a list of same-size images, are what the (n, H, W, 3) array gives.
  np.testing.assert_allclose(np.asarray(probs_of(tuple(images))), listed, rtol=0, atol=0)
  same = test_images[:5]
  np.testing.assert_allclose(
      np.asarray(probs_of(list(same))), np.asarray(probs_of(same)), rtol=0, atol=PROB_ATOL
  )
  # Resized beforehand by PIL (bilinear, as the program reads files) and given as an
  # array: up to uint8 rounding and the resize method, the same input (1e-3 allowed, as
  # tests/test_load_run.py allows).
  by_pil = np.stack(
      [np.asarray(Image.fromarray(im).resize((8, 8), Image.Resampling.BILINEAR)) for im in images]
  )
  np.testing.assert_allclose(listed, np.asarray(probs_of(by_pil)), rtol=0, atol=1e-3)


def test_predict_fn_names_what_it_was_given(demo_run, test_images):
  probs_of = fineflax.predict_fn(fineflax.load_run(demo_run))
  with pytest.raises(ValueError, match=r"^images\[1\] is a str \('b\.png'\): expected uint8 RGB"):
    probs_of([test_images[0], 'b.png'])
  with pytest.raises(
      ValueError,
      match=r'^images\[0\] of shape \(8, 8, 3\) and dtype float32: ' 'expected uint8 RGB',
  ):
    probs_of([test_images[0].astype(np.float32)])
  with pytest.raises(ValueError, match=r'^images\[0\] of shape \(2, 8, 8, 3\) and dtype uint8'):
    probs_of([test_images[:2]])
  with pytest.raises(ValueError, match=r'^images is an empty list: expected'):
    probs_of([])
  with pytest.raises(ValueError, match=r'^images is a dict: expected uint8 RGB'):
    probs_of({'image': test_images[0]})
  with pytest.raises(ValueError, match=r"^images is a str \('a\.png'\): expected") as error:
    probs_of('a.png')
  assert '\n' not in str(error.value)
