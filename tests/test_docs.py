"""The README and docs/*.md stay true of the repository: every training command they give
trains with a training config, the demo's accuracy figure is one figure that meets the demo
config's own expectation, no page points outside the repository or at the projects it grew
from by their private numbers, and every relative link (and its anchor) resolves.

Reads files only: nothing trains here (the demo's figure itself is checked by
tests/test_train.py::test_demo_reaches_95_percent)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest

from fineflax import config as config_lib
from tests.helpers import ROOT

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
_TRAIN = re.compile(r'(?:-m fineflax\.train|\bfineflax-train)(?![.\w])([^\n`\'"|]*)')
_CONFIG_ARG = re.compile(r'--config[ =](\S+)')
_LINK = re.compile(r'(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)')


def _name(page: Path) -> str:
  return page.relative_to(ROOT).as_posix()


def _joined(text: str) -> str:
  """`text` with shell line continuations (a backslash ending a line) joined."""
  return re.sub(r'\\\n\s*', ' ', text)


def train_commands(text: str) -> list[str]:
  """The `--config` argument of every `python -m fineflax.train` / `fineflax-train`
  command in `text` that has one ('configs/demo.py:smoke')."""
  found = []
  for match in _TRAIN.finditer(_joined(text)):
    arg = _CONFIG_ARG.search(match.group(1))
    if arg:
      found.append(arg.group(1))
  return found


def _all_train_commands() -> list[tuple[str, str]]:
  return [(_name(page), arg) for page in PAGES for arg in train_commands(page.read_text())]


def _load_config(spec: str):
  """The module and validated `get_config(arg)` of 'configs/NAME.py[:arg]'."""
  path, _, arg = spec.partition(':')
  file = ROOT / path
  assert file.is_file(), f'{spec}: no such config file'
  assert (
      file.parent == ROOT / 'configs' and file.suffix == '.py'
  ), f'{spec}: not a config of configs/'
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  module = importlib.import_module(f'configs.{file.stem}')
  return module, config_lib.validate(module.get_config(arg or None))


def test_the_command_finder_finds_the_commands():
  assert train_commands('python -m fineflax.train --config configs/a.py --workdir x') == [
      'configs/a.py'
  ]
  assert train_commands('srun python -m fineflax.train \\\n    --config=configs/b.py:smoke') == [
      'configs/b.py:smoke'
  ]
  assert train_commands('`python -m fineflax.train` runs; `fineflax.train.state`') == []
  assert train_commands('python -m fineflax.train --workdir x --config.seed=1') == []
  pages = {page for page, _ in _all_train_commands()}
  assert {'README.md', 'docs/multihost.md', 'docs/running.md'} <= pages, pages


@pytest.mark.parametrize('page, spec', sorted(set(_all_train_commands())))
def test_every_training_command_uses_a_training_config(page, spec):
  module, config = _load_config(spec)
  where = f'{page}: python -m fineflax.train --config {spec}'
  assert Path(spec.partition(':')[0]).name != 'imagenet.py', (
      f"{where}: configs/imagenet.py is the zero-shot predict config (Keras' top, no "
      'training phase of its own); use a training config such as configs/cifar10.py'
  )
  assert not config.model.include_top, f'{where}: a zero-shot (include_top) config'
  assert any(phase.epochs > 0 for phase in config.phases), f'{where}: no phase trains'
  assert '-m fineflax.train' in (
      module.__doc__ or ''
  ), f"{where}: the config's docstring shows no training command of its own"


def _demo_expectation() -> float:
  """The floor the demo config's docstring states ('test accuracy >= 0.95')."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  doc = importlib.import_module('configs.demo').__doc__ or ''
  match = re.search(r'test accuracy >= (0\.\d+)', doc)
  assert match, 'configs/demo.py does not state its expected test accuracy'
  return float(match.group(1))


_DEMO_FIGURE = re.compile(r'test[_ ]accuracy:? (0\.\d{3,})')


def test_the_demo_accuracy_is_one_figure_that_meets_the_demo_configs_expectation():
  readme = (ROOT / 'README.md').read_text()
  demo = readme[readme.index('## The offline demo') :]
  demo = demo[: demo.index('\n## ')]
  stated = _DEMO_FIGURE.findall(demo)
  assert stated, "the README's demo section states no test accuracy"
  figure = stated[0]
  assert (
      float(figure) >= _demo_expectation()
  ), f"the README's demo figure {figure} is below configs/demo.py's expectation"
  assert '270' in demo, "the README's demo section does not say how many test digits"
  copies = {(_name(page), f) for page in PAGES for f in _DEMO_FIGURE.findall(page.read_text())}
  assert {f for _, f in copies} == {
      figure
  }, f'the demo test accuracy is stated differently across the docs: {sorted(copies)}'


_FORBIDDEN = re.compile(r'\.\./shared|\bseeds? 0\d', re.IGNORECASE)


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_no_page_points_outside_the_repository_or_at_seed_numbers(page):
  """`../shared/...` is not in the repository; "seed 004" means nothing to a reader of it
  (name the workflow: "ResNet50 on CIFAR-10 with conv5 fine-tuned", docs/seeds.md)."""
  bad = [
      f'{_name(page)}:{n}: {line.strip()}'
      for n, line in enumerate(page.read_text().splitlines(), 1)
      if _FORBIDDEN.search(line)
  ]
  assert not bad, '\n'.join(bad)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r'[`*_]|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(text: str) -> set[str]:
  """The anchors of the headings of a Markdown page (fenced code skipped)."""
  found, seen, fenced = set(), {}, False
  for line in text.splitlines():
    if line.startswith('```'):
      fenced = not fenced
    match = None if fenced else re.match(r'#{1,6} (.+)', line)
    if match:
      slug = _slug(match.group(1))
      found.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
      seen[slug] = seen.get(slug, 0) + 1
  return found


def test_the_anchor_maker_follows_github():
  assert anchors(
      "# A run's folder\n## Compiled cost (XLA cost analysis)\n## Figures\n"
      '## Figures\n```\n# not a heading\n```\n### `--config` flags'
  ) == {
      'a-runs-folder',
      'compiled-cost-xla-cost-analysis',
      'figures',
      'figures-1',
      '--config-flags',
  }


def _links() -> list[tuple[str, str]]:
  out = []
  for page in PAGES + [ROOT / 'benchmarks' / 'peers' / 'README.md']:
    if page.is_file():
      out += [
          (_name(page), target)
          for target in _LINK.findall(page.read_text())
          if not re.match(r'[a-z]+:', target)
      ]
  return out


@pytest.mark.parametrize('page, target', sorted(set(_links())))
def test_every_relative_link_resolves(page, target):
  path, _, anchor = target.partition('#')
  file = ((ROOT / page).parent / path).resolve() if path else ROOT / page
  shown = os.path.relpath(file, ROOT)
  assert file.is_relative_to(ROOT), f'{page}: link {target}: {shown} is outside the repository'
  assert file.exists(), f'{page}: link {target}: no {shown}'
  if anchor:
    assert file.suffix == '.md', f'{page}: link {target}: an anchor into a non-Markdown file'
    assert anchor in anchors(
        file.read_text()
    ), f'{page}: link {target}: {shown} has no heading #{anchor}'


def _architecture_lists() -> dict[str, set[str]]:
  """Folder -> the module files docs/architecture.md's "What each package owns" block
  names in that folder's entry ('fineflax/train', 'fineflax', 'scripts')."""
  page = (ROOT / 'docs' / 'architecture.md').read_text()
  block = page[page.index('## What each package owns') : page.index('## From the command')]
  entries: dict[str, list[str]] = {}
  current = None
  for line in block.splitlines():
    head = re.match(r'^    (\s*)(\S+)', line)
    if not head:
      continue
    name = head.group(2)
    if len(head.group(1)) == 2 and name.endswith('/'):  # a package of fineflax/
      current = 'fineflax/' + name.rstrip('/')
    elif not head.group(1) and name == 'scripts/':
      current = 'scripts'
    elif not head.group(1) and name in ('fineflax/', 'configs/'):
      current = None
    elif len(head.group(1)) == 2:  # a module of fineflax/ itself, or the shims' line
      current = 'fineflax'
    if current:
      entries.setdefault(current, []).append(line)
  return {
      folder: set(re.findall(r'\b(\w+\.py)\b', ' '.join(lines)))
      for folder, lines in entries.items()
  }


def test_the_architecture_page_names_every_module():
  """docs/architecture.md's package list names every module of fineflax/ and scripts/,
  and no module that is not there (package __init__.py files aside)."""
  listed = _architecture_lists()
  folders = ['fineflax', 'scripts'] + sorted(
      f'fineflax/{p.name}'
      for p in (ROOT / 'fineflax').iterdir()
      if p.is_dir() and (p / '__init__.py').is_file()
  )
  for folder in folders:
    modules = {p.name for p in (ROOT / folder).glob('*.py')} - {'__init__.py'}
    named = listed.get(folder, set()) - {'__init__.py'}
    assert named == modules, (
        f'{folder}: not in docs/architecture.md: '
        f'{sorted(modules - named)}; named but absent: '
        f'{sorted(named - modules)}'
    )


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_no_inline_command_is_cut_across_lines(page):
  """A command in `backticks` is on one line: one wrapped across two source lines breaks
  when copied from the file or a terminal."""
  text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
  wrapped = [
      span
      for span in re.findall(r'`([^`]+)`', text)
      if '\n' in span and re.match(r'\s*(python|pip|fineflax-|bash|tensorboard)\b', span)
  ]
  assert not wrapped, wrapped
