"""`--help` of the four programs, started both ways a user starts them: `python -m
fineflax.NAME` and the `fineflax-NAME` console script (pyproject's [project.scripts]).
Both print the usage paragraph of fineflax/cli/NAME.py's docstring, then the flags under
the program's name, never a file path into the package."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import ROOT

PROGRAMS = ('train', 'evaluate', 'predict', 'summary')

pytestmark = pytest.mark.slow  # starts eight programs


def _help(command: list[str]) -> str:
  env = helpers.program_env()
  done = subprocess.run(
      [*command, '--help'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 1, done.stderr[-2000:]  # absl ends --help with exit status 1
  assert 'Traceback' not in done.stderr, done.stderr[-2000:]
  return done.stdout


@pytest.mark.parametrize('name', PROGRAMS)
def test_both_ways_of_starting_a_program_print_the_same_help(name):
  script = Path(sys.executable).with_name(f'fineflax-{name}')
  assert script.is_file(), f'{script}: the console scripts come with `pip install -e .`'
  usage = importlib.import_module(f'fineflax.cli.{name}').__doc__
  shown = {}
  for program, command in (
      (f'python -m fineflax.{name}', [sys.executable, '-m', f'fineflax.{name}']),
      (f'fineflax-{name}', [str(script)]),
  ):
    text = _help(command)
    assert text.startswith(usage + '\nflags:\n\n' + program + ':\n  --'), (program, text[:3000])
    assert '__main__' not in text and '/fineflax/' not in text, (program, text)
    shown[program] = text.replace(program + ':', 'PROGRAM:', 1)
  assert len(set(shown.values())) == 1
  text = shown[f'fineflax-{name}']
  assert 'Try --helpfull' in text
  for flag in ('--coordinator', '--num_processes', '--process_id'):  # the multi-host flags
    assert flag in text, flag
  if name != 'evaluate':
    assert '--config.KEY=VALUE' in usage and ':smoke' in usage and '--config:' in text
  if name == 'train':
    assert '--workdir' in text
