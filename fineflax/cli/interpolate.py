"""WiSE-FT on a finished run (`fineflax.inference.interpolate.interpolate_run`): the
weights interpolated between the end of an earlier phase (alpha 0) and the final or best
ones (alpha 1), alpha chosen on the validation split, the test split measured once.

  python -m fineflax.interpolate --workdir DIR [--start PHASE] [--end final|best]
                                 [--alphas 0,0.1,...,1]
  fineflax-interpolate ...  the same program

  --start PHASE             the phase whose end is alpha 0 (default: config.wise_ft.start,
                            else the first phase: the head phase of LP-FT)
  --end final|best          alpha 1 (default: config.wise_ft.end, 'final')
  --alphas A,B,...          the alphas evaluated (default: config.wise_ft.alphas, 0 to 1 by 0.1)

Writes DIR/checkpoints/wise_ft/<step>/ (evaluate, predict and load_run open it as
--checkpoint wise_ft), a `wise_ft` record in DIR/results.json (alpha, the validation curve,
the test metrics) and DIR/wise_ft.png; a new search replaces the last.
"""

from __future__ import annotations

import jax
from absl import app, flags

from fineflax.cli import common
from fineflax.inference.interpolate import interpolate_run


def _alphas(text: str | None) -> tuple[float, ...] | None:
  if text is None:
    return None
  try:
    return tuple(float(a) for a in text.split(','))
  except ValueError:
    raise app.UsageError(f'--alphas={text!r}: expected numbers separated by commas') from None


def main() -> None:
  """The program (also the `fineflax-interpolate` command)."""
  workdir = flags.DEFINE_string('workdir', None, 'Directory of a finished run.')
  start = flags.DEFINE_string('start', None, 'The phase whose end is alpha 0.')
  end = flags.DEFINE_enum('end', None, ['final', 'best'], 'Alpha 1.')
  alphas = flags.DEFINE_string('alphas', None, 'Comma-separated alphas in [0, 1].')
  flags.mark_flag_as_required('workdir')
  join = common.define_distributed_flags()

  def absl_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    join()
    record = interpolate_run(workdir.value, start.value, end.value, _alphas(alphas.value))
    if jax.process_index() == 0:
      for point in record['curve']:
        mark = '  <- chosen' if point['alpha'] == record['alpha'] else ''
        print(
            f"alpha {point['alpha']:.2f}: val_loss {point['val_loss']:.4f} "
            f"val_accuracy {point['val_accuracy']:.4f}{mark}"
        )
      if 'test_accuracy' in record:
        print(
            f"test split at alpha {record['alpha']:g}: accuracy {record['test_accuracy']:.4f}, "
            f"loss {record['test_loss']:.4f} ({record['test_examples']} examples)"
        )
      print(f"weights: {workdir.value}/{record['dir']} (--checkpoint wise_ft)")

  common.run_absl(absl_main, __doc__)
