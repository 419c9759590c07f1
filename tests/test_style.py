"""The code keeps pyproject's [tool.ruff] rules: `ruff check` (pyflakes, pycodestyle,
import order) finds nothing in the package, the scripts, the configs and the tests."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT

CHECKED = ('fineflax', 'scripts', 'configs', 'tests')


def test_ruff_check_finds_nothing():
  done = subprocess.run(
      [sys.executable, '-m', 'ruff', 'check', '--output-format', 'concise', '--quiet',
       *CHECKED], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  if done.returncode != 0:
    # One line per finding (path:line:column: code message); `ruff check --fix` mends
    # those marked [*]. A stderr is ruff's own error (a bad [tool.ruff] table, say).
    findings = done.stdout.strip().splitlines()
    pytest.fail('\n'.join([f'ruff check: {len(findings)} findings', *findings,
                           done.stderr.strip()]).strip(), pytrace=False)
