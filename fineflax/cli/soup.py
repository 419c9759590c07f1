"""Model soups (`fineflax.inference.soup.soup_runs`): the weights of several runs of one
model averaged into a run folder that evaluate, predict and load_run open.

  python -m fineflax.soup --out DIR RUN [RUN ...]              uniform average
  python -m fineflax.soup --out DIR --greedy RUN [RUN ...]     greedy soup
  python -m fineflax.soup --out DIR --last K RUN               the last K checkpoints of a run
  fineflax-soup ...         the same program

  --checkpoint best|latest|wise_ft|STEP   which checkpoint of each run (default best)
  --greedy                  sort the runs by validation accuracy and add each only if the
                            soup's validation accuracy does not drop (Wortsman et al. 2022)
  --overwrite               replace an existing --out

Runs of another backbone, head, class list or image size are refused, naming the first
difference. The soup is measured on the first run's validation and test splits; the
report (ingredients, those kept, each greedy step's validation figures, the soup's val_*
and test_*) goes to DIR/results.json and the weights to DIR/checkpoints/soup/0/.
"""

from __future__ import annotations

import jax
from absl import app, flags

from fineflax.cli import common
from fineflax.inference.soup import soup_runs


def main() -> None:
  """The program (also the `fineflax-soup` command)."""
  out = flags.DEFINE_string('out', None, 'The run folder to write the soup to.')
  greedy = flags.DEFINE_bool('greedy', False, 'A greedy soup (else uniform).')
  last = flags.DEFINE_integer('last', None, 'Average the last K checkpoints of one run.')
  checkpoint = flags.DEFINE_string('checkpoint', 'best', 'Which checkpoint of each run.')
  overwrite = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.mark_flag_as_required('out')
  join = common.define_distributed_flags()

  def absl_main(argv: list[str]) -> None:
    if len(argv) < 2:
      raise app.UsageError('give one run folder or more')
    join()
    report = soup_runs(
        out.value,
        argv[1:],
        greedy=greedy.value,
        last=last.value,
        checkpoint=checkpoint.value,
        overwrite=overwrite.value,
    )
    if jax.process_index() == 0:
      for step in report['tried']:
        print(
            f"{'kept   ' if step['kept'] else 'dropped'} {step['ingredient']}: soup val_accuracy "
            f"{step['val_accuracy']:.4f}"
        )
      print(f"{report['method']} soup of {len(report['kept'])} of {len(report['ingredients'])}:")
      for role in ('val', 'test'):
        if f'{role}_accuracy' in report:
          print(
              f"  {role}: accuracy {report[f'{role}_accuracy']:.4f}, loss "
              f"{report[f'{role}_loss']:.4f} ({report[f'{role}_examples']} examples)"
          )
      print(
          f'  weights: {out.value}/checkpoints/soup/0 '
          f'(python -m fineflax.evaluate --workdir {out.value})'
      )

  common.run_absl(absl_main, __doc__)
