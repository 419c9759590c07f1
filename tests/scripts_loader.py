"""The programs of scripts/ imported as modules, once a process: a script defines its absl
flags as it is imported, and a second import in one process (two test files on one pytest
worker) would define them again (DuplicateFlagError)."""

import importlib.util
import sys
from types import ModuleType

from tests import helpers

SCRIPTS = helpers.ROOT / 'scripts'


def load(name: str) -> ModuleType:
  """scripts/NAME.py as a module (the one loaded before, if any)."""
  key = f'fineflax_script_{name}'
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]
