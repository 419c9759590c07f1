"""Writes tests/file_seconds.json, the seconds each test file took, from the JUnit XML of a
full run (tests/conftest.py starts the longest files first):

    python -m pytest -q -n 2 --dist loadfile tests --junitxml=/tmp/suite.xml
    python -m tests.schedule /tmp/suite.xml
"""

import collections
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests.conftest import FILE_SECONDS


def file_seconds(junit_xml: str) -> dict[str, float]:
  """{'test_train.py': seconds} summed over each file's test cases."""
  totals = collections.Counter()
  for case in ElementTree.parse(junit_xml).iter('testcase'):
    name = case.get('classname', '').split('.')[1] + '.py'  # 'tests.test_train'
    totals[name] += float(case.get('time', 0))
  return {name: round(s, 1) for name, s in sorted(totals.items(), key=lambda kv: -kv[1])}


if __name__ == '__main__':
  FILE_SECONDS.write_text(json.dumps(file_seconds(sys.argv[1]), indent=1) + '\n')
  print(f'wrote {Path(FILE_SECONDS).name}')
