"""docs/configs.md against the code: the generated reference equals what the code generates
now, its keys are exactly the config's keys, its errors are what validation raises, and the
example config files and command-line overrides it shows work as it says."""

import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from fineflax import config as config_lib
from fineflax.errors import ConfigError
from tests import scripts_loader
from tests.helpers import ROOT

DOC = ROOT / 'docs' / 'configs.md'
config_docs = scripts_loader.load('config_docs')
DEMO = str(ROOT / 'configs' / 'demo.py')

# ml_collections loads config files with importlib's load_module (its business, not ours).
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')


def _doc() -> str:
  return DOC.read_text()


def _load(*argv: str) -> ml_collections.ConfigDict:
  """`--config` and its overrides parsed as `fineflax.cli.common.run_program` parses them:
  unknown keys refused first, then ml_collections' config flag on the same arguments."""
  argv = ['prog', *argv]
  config_lib.check_override_flags(argv[1:])
  values = flags.FlagValues()  # not absl's global FLAGS: every call defines --config anew
  holder = config_flags.DEFINE_config_file(
      'config', None, 'config file', flag_values=values, sys_argv=argv
  )
  values(argv)
  return holder.value


def _keys(values, prefix=''):
  """The leaf keys of a config, as the doc names them."""
  out = set()
  for key, value in values.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _keys(value, f'{prefix}{key}.')
    elif key != 'phases':
      out.add(prefix + key)
  return out


def _table_rows(text):
  """(key, cells) of each row of the doc's key table, read from the Markdown itself."""
  rows = []
  for line in text.splitlines():
    cells = [c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]]
    if len(cells) == 6 and re.fullmatch(r'`[\w.\[\]]+`', cells[0]):
      rows.append((cells[0].strip('`'), cells))
  return rows


def _python_examples(text):
  return [b for b in re.findall(r'```python\n(.*?)```', text, re.S) if 'def get_config' in b]


def test_generated_part_is_current():
  assert (
      config_docs.generated() in _doc()
  ), 'docs/configs.md is stale: run python scripts/config_docs.py --write'


def test_write_replaces_only_the_generated_part(tmp_path):
  page = tmp_path / 'configs.md'
  page.write_text(f'# before\n\n{config_docs.BEGIN}\nold\n{config_docs.END}\n\nafter\n')
  config_docs.write(page)
  assert page.read_text() == f'# before\n\n{config_docs.generated()}\n\nafter\n'


def test_documented_keys_are_the_config_keys():
  rows = _table_rows(_doc())
  documented = [key for key, _ in rows]
  assert len(documented) == len(set(documented))
  defaults = _keys(config_lib.default_config())
  defaults |= {'phases[i].' + k for k in _keys(config_lib.phase())}
  assert set(documented) == defaults
  assert {k for k in _keys(config_lib.default_config().phases[0])} == {
      k[len('phases[i].') :] for k in documented if k.startswith('phases[i].')
  }


def test_documented_defaults_are_the_defaults():
  config, phase = config_lib.default_config(), config_lib.phase()
  for key, cells in _table_rows(_doc()):
    node = phase if key.startswith('phases[i].') else config
    for part in key.removeprefix('phases[i].').split('.'):
      node = node[part]
    assert cells[2] == f'`{node!r}`', key


def test_documented_errors_are_raised():
  """Each row's wrong value, read from the doc and set as the doc shows, raises the
  error the doc gives (so the doc is not merely the generator's output, but true)."""
  rows = _table_rows(_doc())
  assert rows
  for key, cells in rows:
    shown = re.fullmatch(r'`(.*)`', cells[5]).group(1).replace('\\|', '|')
    code = re.fullmatch(r'`(.*)`', cells[4]).group(1).replace('\\|', '|')
    config = config_lib.default_config()
    statement = code if code.startswith('config.') else f'config.phases = ({code},)'
    with pytest.raises((ConfigError, TypeError)) as error:
      exec(statement, {'config': config, 'phase': config_lib.phase})  # pylint: disable=exec-used
      config_lib.validate(config)
    assert f'{type(error.value).__name__}: {error.value}' == shown, key


def test_the_good_value_of_each_key_passes():
  """The wrong values are wrong because of the value: the defaults validate."""
  config_lib.validate(config_lib.default_config())
  for key, field in config_docs.fields():
    assert field.default is None or isinstance(field.default, field.types), key


def test_a_wrong_value_that_passes_breaks_the_generator(monkeypatch):
  monkeypatch.setitem(config_docs.SPECIAL, 'seed', 7)
  with pytest.raises(AssertionError, match='seed=7 raised no error'):
    config_docs.generated()


def test_prose_messages_are_real():
  doc = ' '.join(_doc().split())  # the prose wraps lines
  with pytest.raises(ConfigError) as error:
    config_lib.check_override_flags(['--config.model.heads.dropout=0.1'])
  assert f'error: {error.value}' in doc
  config = config_lib.default_config()
  config.model.head.dropout = 2.0
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  assert f'`error: {error.value}`' in doc


def test_example_config_file_loads(tmp_path):
  first = _python_examples(_doc())[0]
  (tmp_path / 'digits.py').write_text(first)
  full = config_lib.validate(_load(f'--config={tmp_path / "digits.py"}'))
  assert [p.name for p in full.phases] == ['scratch', 'finetune']
  assert full.phases[0].early_stopping.patience == 3
  assert full.phases[0].early_stopping.monitor == 'val_loss'  # the section's other keys kept
  smoke = config_lib.validate(_load(f'--config={tmp_path / "digits.py"}:smoke'))
  assert smoke.batch_size == 16 and [p.epochs for p in smoke.phases] == [1, 1]


def test_extending_a_config_as_the_doc_shows(tmp_path):
  examples = _python_examples(_doc())
  assert len(examples) == 2
  extension = examples[1]
  assert 'from configs import demo' in extension
  # Elsewhere than configs/: the import goes through sys.path, as from the repository root.
  (tmp_path / 'demo_wide.py').write_text(extension)
  path = str(tmp_path / 'demo_wide.py')
  base = config_lib.validate(_load(f'--config={DEMO}'))
  wide = config_lib.validate(_load(f'--config={path}'))
  assert wide.model.head.hidden == (64,) and base.model.head.hidden == ()
  assert [p.name for p in wide.phases] == ['scratch', 'finetune', 'all']
  assert wide.phases[1].epochs == 8 and base.phases[1].epochs == 4
  assert wide.phases[0] == base.phases[0] and wide.model.backbone == base.model.backbone
  smoke = config_lib.validate(_load(f'--config={path}:smoke'))
  assert [p.epochs for p in smoke.phases] == [1, 1, 1] and smoke.model.head.hidden == (64,)
  over = _load(
      f'--config={path}:smoke', '--config.phases[1].learning_rate=1e-5', '--config.batch_size=8'
  )
  assert over.phases[1].learning_rate == 1e-5 and over.batch_size == 8


def test_overrides_work_as_the_doc_says():
  doc = ' '.join(_doc().split())
  config = _load(
      f'--config={DEMO}',
      '--config.model.head.dropout=0.3',
      '--config.phases[0].early_stopping.patience=5',
      '--config.model.num_classes=3',
      '--config.phases[0].weight_decay=0.1',
      '--noconfig.report.plot',
      '--config.model.head.hidden=256',
      '--config.data.val_split=None',
  )
  assert config.model.head.dropout == 0.3 and config.phases[0].early_stopping.patience == 5
  assert config.model.num_classes == 3 and config.phases[0].weight_decay == 0.1
  assert config.report.plot is False and config.model.head.hidden == (256,)
  assert config.data.val_split == 'None'  # the text, not None: as the doc warns
  assert _load(
      f'--config={DEMO}', '--config.model.head.hidden=(256, 128)', '--config.report.plot=false'
  ).model.head.hidden == (256, 128)
  with pytest.raises(flags.IllegalFlagValueError) as error:
    _load(f'--config={DEMO}', '--config.batch_size=abc')
  assert f'FATAL Flags parsing error: {error.value}' in doc
  with pytest.raises(Exception) as error:  # noqa: B017 (ml_collections does not export it)
    _load('--config.batch_size=8', f'--config={DEMO}')
  assert f'{type(error.value).__name__}: {error.value}' in doc
  with pytest.raises(ConfigError, match='unknown config key config.phases'):
    _load(f'--config={DEMO}', '--config.phases=()')
  with pytest.raises(
      Exception,
      match=re.escape(  # noqa: B017 (ml_collections' own error)
          "Type <class 'NoneType'> of field config.loss.class_weight is not supported for "
          'overriding'
      ),
  ):
    _load(f'--config={DEMO}', '--config.loss.class_weight=balanced')


def test_wrong_type_in_a_config_file_fails_as_the_doc_says(tmp_path):
  (tmp_path / 'bad.py').write_text(
      'from fineflax import config as ffc\n\n'
      'def get_config(arg=None):\n'
      '  config = ffc.default_config()\n'
      "  config.batch_size = '64'\n"
      '  return ffc.finish(config, arg)\n'
  )
  with pytest.raises(flags.IllegalFlagValueError) as error:
    _load(f'--config={tmp_path / "bad.py"}')
  message = str(error.value)
  assert message.startswith(
      f'flag --config={tmp_path / "bad.py"}: Error whilst parsing config ' 'file:'
  )
  assert "TypeError: Could not override field 'batch_size'" in message
  with pytest.raises(flags.IllegalFlagValueError, match="config argument 'fast'"):
    _load(f'--config={DEMO}:fast')


def test_smoke_and_overrides_order():
  """Overrides apply after get_config(arg): they win over :smoke."""
  smoke = _load(f'--config={DEMO}:smoke', '--config.batch_size=8')
  assert smoke.batch_size == 8 and smoke.data.max_examples == 32
  assert _load(f'--config={DEMO}:').batch_size == 64  # an empty argument: as written


def test_the_one_line_errors_of_the_command_line_are_the_doc_s():
  # tests/test_bad_input.py runs the tools and checks that these are what they print.
  from tests.test_bad_input import ONE_LINE_ERRORS  # pylint: disable=g-import-not-at-top

  doc = ' '.join(_doc().split())
  for _, message in ONE_LINE_ERRORS:
    assert message in doc, message
