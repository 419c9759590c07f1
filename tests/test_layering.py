"""The layering of docs/architecture.md holds: the import-linter contracts in
pyproject.toml (a lower layer never imports a higher one; the config layer imports
nothing above errors; no library module imports a program)."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_import_contracts_are_kept():
  lint = Path(sys.executable).with_name('lint-imports')
  result = subprocess.run(
      [str(lint), '--no-cache'], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert 'Contracts: 3 kept, 0 broken.' in result.stdout
