"""A folder of photos with unreadable files trains as one without them.

The case: 3 classes of JPEGs and one truncated file, a validation split carved out,
several epochs. A split sized by the files listed rather than read would end every epoch
on a batch of padding only, whose 0/0 loss makes every parameter NaN. Here such folders
train for several epochs on 1 and on 8 devices, from host memory and from the devices, to
finite losses; every epoch takes ceil(readable / batch) steps; and
evaluation counts each readable example exactly once.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fineflax import config as config_lib, train
from fineflax.inference.evaluate import evaluate_run
from fineflax.run.reporting import MetricsLog
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs on 1 and 8 devices

CLASSES = ('a', 'b', 'c')
BATCH = 8


def _write_images(folder: Path, counts: tuple[int, ...], rng: np.random.Generator) -> None:
  """counts[c] JPEGs (24 wide, 20 high) in class folder c, darker to lighter by class."""
  for c, name in enumerate(CLASSES):
    (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(counts[c]):
      pixels = rng.integers(0, 80, (20, 24, 3)) + 80 * c
      Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f'{i:03d}.jpg')


def _spoil(folder: Path, how_many: int) -> None:
  """Adds `how_many` unreadable image files: a truncated JPEG (the first 300 bytes of a
  good one, as in the walkthrough), an empty file, text named .png, in turn."""
  good = (folder / 'b' / '000.jpg').read_bytes()
  kinds = [('truncated.jpg', good[:300]), ('empty.jpg', b''), ('notes.png', b'not an image')]
  for k in range(how_many):
    name, content = kinds[k % len(kinds)]
    (folder / CLASSES[(k + 1) % len(CLASSES)] / f'055_{k}_{name}').write_bytes(content)


def _config(source: str, *, carve: bool, resident: bool):
  cfg = helpers.tiny_config(
      config_lib.phase(name='a', optimizer='adam', learning_rate=1e-3, epochs=3),
      batch_size=BATCH,
      source=source,
      device_resident=resident,
  )
  cfg.seed = 0
  if carve:  # the walkthrough's Keras-style carve: no test split
    cfg.data.validation_split = 0.2
    cfg.data.split_seed = 5  # a shuffle that leaves every unreadable file in train
    cfg.data.test_split = None
  return cfg


# (validation carved out of one folder, or train/validation/test folders; good images per
#  class (of train); unreadable files (in train); devices; splits placed on the devices).
# The counts make the train split's readable examples a multiple of the batch, as in the
# walkthrough (288 = 18 x 16), so that sizing the epoch by the files listed would add a
# batch of padding only.
CASES = {
    'walkthrough-one-file-1-device-resident': (True, (24, 23, 23), 1, 1, True),
    'several-files-8-devices-host-memory': (False, (8, 8, 8), 3, 8, False),
    'several-files-8-devices-resident': (True, (24, 24, 23), 4, 8, True),
    'one-file-1-device-host-memory': (False, (8, 8, 8), 1, 1, False),
}


@pytest.mark.parametrize(
    'carve, good, bad, devices, resident', list(CASES.values()), ids=list(CASES)
)
def test_unreadable_files_are_left_out_and_training_stays_finite(
    tmp_path, carve, good, bad, devices, resident
):
  rng = np.random.default_rng(0)
  photos = tmp_path / 'photos'
  if carve:  # the carve takes int(0.2 * files listed) for validation
    _write_images(photos, good, rng)
    _spoil(photos, bad)
  else:
    for name, counts in (('train', good), ('validation', (6,) * 3), ('test', (5,) * 3)):
      _write_images(photos / name, counts, rng)
    _spoil(photos / 'train', bad)
    _spoil(photos / 'validation', 1)
    _spoil(photos / 'test', 2)
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(
      _config(f'folder:{photos}', carve=carve, resident=resident),
      workdir,
      devices=jax.devices()[:devices],
  )

  splits = json.loads((workdir / 'dataset.json').read_text())['splits']
  if carve:
    n_val = int(0.2 * (sum(good) + bad))
    # Every file was either read or skipped, the unreadable ones all in train.
    assert (splits['train']['skipped_files'], splits['val']['skipped_files']) == (bad, 0)
    assert splits['train']['examples'] + splits['val']['examples'] == sum(good)
    assert splits['val']['examples'] == n_val
  else:
    assert {role: (s['examples'], s['skipped_files']) for role, s in splits.items()} == {
        'train': (sum(good), bad),
        'val': (3 * 6, 1),
        'test': (3 * 5, 2),
    }
    assert results['test_examples'] == 3 * 5
    assert math.isfinite(results['test_loss'])
  assert splits['train']['examples'] % BATCH == 0
  steps_per_epoch = splits['train']['examples'] // BATCH
  records = MetricsLog(workdir).read()
  assert [r['step'] for r in records] == [steps_per_epoch * (e + 1) for e in range(3)]
  for r in records:
    assert math.isfinite(r['loss']) and math.isfinite(r['val_loss']), r
  assert records[-1]['loss'] < records[0]['loss']  # and it learns

  report = evaluate_run(workdir, 'val', devices=jax.devices()[:devices])
  assert report['examples'] == splits['val']['examples']
  assert math.isfinite(report['loss'])
