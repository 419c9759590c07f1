"""The code keeps pyproject's style: pyink (flax's formatter: Google style, 2-space
indents) leaves every file as it is, and `ruff check` (pyflakes, pycodestyle, import
order) finds nothing, in the package, the scripts, the configs and the tests."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT

CHECKED = ('fineflax', 'scripts', 'configs', 'tests')


def _fails(command: list[str], what: str) -> str | None:
  """The failure text of a checker's run, one line per finding, or None when clean."""
  done = subprocess.run(
      [sys.executable, '-m', *command, *CHECKED],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  if done.returncode == 0:
    return None
  findings = [line for line in (done.stdout + done.stderr).strip().splitlines() if line]
  return '\n'.join([f'{what}: {len(findings)} lines', *findings])


def test_pyink_leaves_every_file_as_it_is():
  # `pyink fineflax scripts configs tests` reformats the files it names here.
  failure = _fails(['pyink', '--check', '--quiet'], 'pyink --check')
  if failure:
    pytest.fail(failure, pytrace=False)


def test_ruff_check_finds_nothing():
  # path:line:column: code message; `ruff check --fix` mends those marked [*]. A line on
  # stderr is ruff's own error (a bad [tool.ruff] table, say).
  failure = _fails(['ruff', 'check', '--output-format', 'concise', '--quiet'], 'ruff check')
  if failure:
    pytest.fail(failure, pytrace=False)
