"""scripts/benchmark_input.py runs: it counts every image of every timed batch (across an
epoch's end), reports a rate, and gives an absent peer a row that says so. No test here
asserts a speed."""

import json

from tests import scripts_loader

benchmark_input = scripts_loader.load('benchmark_input')


def test_the_streaming_path_is_timed_over_every_image_it_delivers(monkeypatch, capsys):
  """16 images in batches of 4 are 4 batches an epoch: 1 warm-up and 5 timed batches run
  into the second epoch, and all 20 timed images count (a short batch would not give 20;
  the script stops on an epoch that ends with fewer than its 4 batches)."""
  monkeypatch.setattr(benchmark_input, 'missing', lambda p: 'torch' if p == 'torch' else None)
  records = benchmark_input.main(
      [
          '--make',
          '16',
          '--workers',
          '0',
          '--batch',
          '4',
          '--batches',
          '5',
          '--warmup',
          '1',
          '--only',
          'fineflax,torch',
          '--markdown',
      ]
  )
  ours, peer = records
  assert (ours['pipeline'], ours['workers'], ours['batch']) == ('fineflax', 0, 4)
  assert ours['images'] == 5 * 4
  assert ours['epochs_timed'] == 1
  assert ours['img_per_s'] > 0 and ours['run_img_per_s'] == [ours['img_per_s']]
  assert ours['img_per_s_per_worker'] is None  # W=0: no worker processes
  assert peer['img_per_s'] is None and peer['note'] == 'not installed (torch)'
  lines = capsys.readouterr().out.splitlines()
  machine = json.loads(lines[0])
  assert machine['what'] == 'machine' and machine['cpu_count'] >= 1
  assert [json.loads(line)['pipeline'] for line in lines[1:3]] == ['fineflax', 'torch']
  assert lines[3].startswith('| pipeline | workers |')
  assert lines[5].startswith('| fineflax | 0 | 4 | ')
  assert lines[6].startswith('| torch | 0 | 4 | not installed (torch) |')
