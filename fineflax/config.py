"""Config defaults, their meaning, and validation of user configs.

`SCHEMA` below is the one list of config keys: `default_config()` is built from it, and
`validate()` checks a user's config against it before anything runs, naming the key of
any unknown key (with the nearest known one), wrong type or bad value. A config file
starts from `default_config()`, sets what it needs, builds its phases with `phase()`, and
ends with `finish(config, arg)` so that every config accepts the `:smoke` argument.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from typing import Any, Callable, Sequence

import ml_collections
from ml_collections import config_dict

from fineflax import data, freeze, models, optimizers, weights
from fineflax.data.augment import FILL_MODES, FLIPS
from fineflax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: default, accepted types, meaning, and an optional value check."""

  default: Any
  types: tuple[type, ...]
  help: str
  optional: bool = False  # None allowed
  check: Callable[[Any], str | None] | None = None  # returns an error text or None


def _choices(options: Callable[[], Sequence[str]] | Sequence[str]):
  def check(value):
    allowed = options() if callable(options) else options
    if value not in allowed:
      return f'expected one of {sorted(allowed)}'
    return None
  return check


def _at_least(low: float):
  return lambda v: None if v >= low else f'must be >= {low}'


def _positive(v):
  return None if v > 0 else 'must be > 0'


def _fraction(v):
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def _freeze_spec(v):
  try:
    freeze.check_syntax(v)
  except freeze.FreezeSpecError as e:
    return str(e)
  return None


def _source(v):
  name, _, arg = v.partition(':')
  if name not in data.SOURCES:
    return f'unknown source {name!r}; expected one of {sorted(data.SOURCES)}'
  argument = {'tfds': 'NAME', 'folder': 'PATH', 'synthetic': 'N:SIDE'}
  if name in argument and not arg:
    return f"expected '{name}:{argument[name]}'"
  return None


def _class_weight(v):
  if isinstance(v, str):
    return None if v == 'balanced' else "expected 'balanced' or one weight per class"
  if not v or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                      for w in v):
    return 'must be a non-empty tuple of weights >= 0, one per class'
  return None


def _hidden(v):
  if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in v):
    return 'must be a tuple of positive ints (the widths of hidden Dense layers)'
  return None


_INT, _FLOAT, _STR, _BOOL, _SEQ = (int,), (float, int), (str,), (bool,), (tuple, list)
METRICS = ('loss', 'accuracy', 'val_loss', 'val_accuracy')

SCHEMA: dict[str, Any] = {
    'seed': Field(0, _INT, 'Seed of parameter init, data order and dropout.'),
    'batch_size': Field(64, _INT, 'Global training batch size (all devices, all hosts).',
                        check=_positive),
    'eval_batch_size': Field(None, _INT, 'Evaluation batch size; None: batch_size.',
                             optional=True, check=_positive),
    'dtype': Field('auto', _STR, "Compute dtype; 'auto': bfloat16 on GPU/TPU, float32 on "
                   'CPU. Parameters are float32 always.',
                   check=_choices(('auto', 'float32', 'bfloat16'))),
    'model': {
        'backbone': Field('resnet50', _STR, 'Backbone name (fineflax.models.BACKBONES).',
                          check=_choices(lambda: models.BACKBONES)),
        'weights': Field(None, _STR, "Pretrained weights: None (random init), 'imagenet' (the "
                         "backbone's default), a source name ('keras:imagenet', "
                         "'torchvision:IMAGENET1K_V2') or a .h5/.pth/.pt/.safetensors path.",
                         optional=True),
        'include_top': Field(False, _BOOL, "Keep Keras' ImageNet classifier (avg_pool + "
                             'predictions; VGG16: flatten, fc1, fc2, predictions) as the head '
                             'instead of config.model.head.'),
        'num_classes': Field(None, _INT, "Output units (1: binary, sigmoid); None: the "
                             "dataset's number of classes.", optional=True, check=_positive),
        'image_size': Field(None, _INT, 'Side the images are resized to on the device; '
                            'None: the size the data comes in.', optional=True,
                            check=_positive),
        'preprocessing': Field('auto', _STR, "Input normalisation: 'caffe', 'tf' ([-1, 1]),"
                               " 'torch' (mean/std); 'auto': the backbone's.",
                               check=_choices(('auto', 'caffe', 'tf', 'torch'))),
        'head': {
            'pooling': Field('avg', _STR, "'avg', 'max' (global pooling) or 'flatten'.",
                             check=_choices(('avg', 'max', 'flatten'))),
            'hidden': Field((), _SEQ, 'Widths of hidden Dense layers.', check=_hidden),
            'activation': Field('relu', _STR, "Activation of the hidden Dense layers: 'relu' "
                                "or 'linear' (seed 002's Dense(256) has none).",
                                check=_choices(('relu', 'linear'))),
            'dropout': Field(0.0, _FLOAT, 'Dropout rate before the classifier; 0: none.',
                             check=_fraction),
            'batchnorm': Field(False, _BOOL, 'BatchNormalization before the classifier.'),
        },
    },
    'data': {
        'source': Field('digits', _STR, "'digits' (the demo's), 'tfds:NAME' "
                        "(tensorflow-datasets), 'folder:PATH' (a folder per class) or "
                        "'synthetic:N:SIDE' (random images, for benchmarks).",
                        check=_source),
        'train_split': Field('train', _STR, 'Split to train on.'),
        'val_split': Field('validation', _STR, 'Split evaluated after every epoch; None: '
                           'none.', optional=True),
        'test_split': Field('test', _STR, 'Split evaluated at the end; None: none.',
                            optional=True),
        'max_examples': Field(None, _INT, 'Keep the first N examples of each split (smoke '
                              'runs); None: all.', optional=True, check=_positive),
        'load_size': Field(None, _INT, 'Side images are resized to as they are read (photos '
                           'of varying size); None: as stored.', optional=True,
                           check=_positive),
        'validation_split': Field(0.0, _FLOAT, 'folder: the fraction of the images carved '
                                  'out as the validation split.', check=_fraction),
        'split_seed': Field(1337, _INT, 'folder: seed of the shuffle before the carve.'),
        'data_dir': Field(None, _STR, "tfds: where datasets are prepared; None: tfds' "
                          'default (~/tensorflow_datasets).', optional=True),
        'manual_dir': Field(None, _STR, 'tfds: where the files a dataset is built from are '
                            'put by hand (offline).', optional=True),
        'device_resident': Field(True, _BOOL, 'Place the splits on every device once when '
                                 'they fit, and gather batches there.'),
        'device_resident_max_mb': Field(4096, _INT, 'The size (all splits) up to which they '
                                        'are placed on the devices.', check=_at_least(0)),
        'augment': {
            'flip': Field('none', _STR, "Keras RandomFlip: 'horizontal', 'vertical', "
                          "'horizontal_and_vertical' or 'none'.", check=_choices(FLIPS)),
            'rotation': Field(0.0, _FLOAT, 'Keras RandomRotation factor: a fraction of a full '
                              'turn (0.1: up to 36 degrees either way).', check=_fraction),
            'zoom': Field(0.0, _FLOAT, 'Keras RandomZoom factor: zoom in or out by up to this '
                          'fraction.', check=_fraction),
            'translate': Field(0.0, _FLOAT, 'Keras RandomTranslation factor: shift by up to '
                               'this fraction of the side.', check=_fraction),
            'crop': Field(None, _INT, 'Keras RandomCrop side, taken from the stored image before '
                          'the resize (evaluation: centre crop).', optional=True,
                          check=_positive),
            'fill_mode': Field('reflect', _STR, 'What fills pixels from outside the image.',
                               check=_choices(FILL_MODES)),
            'fill_value': Field(0.0, _FLOAT, "The fill with fill_mode 'constant'."),
            'mixup': Field(0.0, _FLOAT, 'Mixup alpha (Beta(alpha, alpha) weights); 0: off.',
                           check=_at_least(0)),
        },
    },
    'loss': {
        'label_smoothing': Field(0.0, _FLOAT, 'Label smoothing of the softmax loss.',
                                 check=_fraction),
        'class_weight': Field(None, (str, tuple, list), "Keras class_weight: 'balanced' "
                              '(n_examples / (n_classes * n_class) from the train split) or '
                              'one weight per class; None: all 1.', optional=True,
                              check=_class_weight),
    },
    'features': {
        'cache': Field('auto', _STR, "Cached-feature mode for phases that train only the head "
                       "without augmentation: 'auto' (in memory up to features.memory_mb, "
                       "else on disk under DIR/features), 'memory', 'disk' or 'off'.",
                       check=_choices(('auto', 'memory', 'disk', 'off'))),
        'memory_mb': Field(2048, _INT, "'auto': the size up to which features are held in "
                           'memory.', check=_at_least(0)),
    },
    'report': {
        'progress': Field('auto', _STR, "Per-epoch progress: 'bar' (a terminal bar), 'lines' "
                          "(plain lines), 'off'; 'auto': a bar on a TTY, lines otherwise.",
                          check=_choices(('auto', 'bar', 'lines', 'off'))),
        'tensorboard': Field(True, _BOOL, 'Write TensorBoard event files under DIR/tb.'),
        'plot': Field(True, _BOOL, 'Redraw DIR/history.png after every epoch.'),
    },
    'checkpoint': {
        'keep': Field(3, _INT, 'How many of the latest checkpoints to keep (latest/).',
                      check=_positive),
        'every_steps': Field(None, _INT, 'Also save every N steps (besides every epoch and '
                             'on SIGTERM); None: per epoch only.', optional=True,
                             check=_positive),
        'monitor': Field('val_loss', _STR, 'The metric best/ keeps the best of.',
                         check=_choices(METRICS)),
        'mode': Field('auto', _STR, "'min' or 'max': which value of `monitor` is best; "
                      "'auto': max for accuracies, min for losses.",
                      check=_choices(('auto', 'min', 'max'))),
    },
    'allow_config_change': Field(False, _BOOL, 'Resume a workdir whose config.json differs '
                                 'in more than epochs, appended phases, reporting and '
                                 'checkpoint cadence (refused otherwise).'),
    'init_from': Field(None, _STR, "Start from another run's parameters: its workdir, a "
                       'checkpoint step folder or a converted checkpoint; layers of '
                       'another shape (a new head) are initialised and reported.',
                       optional=True),
}

PHASE_SCHEMA: dict[str, Any] = {
    'name': Field('', _STR, "Phase name in logs and metrics; '': 'phase<i>'."),
    'freeze': Field('none', _STR, "What is frozen: 'none', 'backbone', 'layers[A:B]' "
                    "(Keras layer slice) or 'regex:PATTERN' (parameter paths).",
                    check=_freeze_spec),
    'optimizer': Field('adam', _STR, 'Optimizer (fineflax.optimizers.OPTIMIZERS).',
                       check=_choices(optimizers.OPTIMIZERS)),
    'learning_rate': Field(1e-3, _FLOAT, 'Learning rate.', check=_positive),
    'momentum': Field(0.0, _FLOAT, 'Momentum of sgd and rmsprop; 0: none.', check=_fraction),
    'nesterov': Field(False, _BOOL, 'Nesterov momentum (sgd).'),
    'weight_decay': Field(None, _FLOAT, 'Decoupled weight decay (x learning rate, as Keras '
                          'and optax.adamw apply it) of the trainable kernels and biases; '
                          "None: 1e-4 for adamw, 0 otherwise.", optional=True,
                          check=_at_least(0)),
    'decay_batchnorm': Field(False, _BOOL, 'Also decay BatchNormalization scale/offset.'),
    'schedule': Field('constant', _STR, "Learning rate schedule over the phase: 'constant', "
                      "'cosine' (to 0), 'warmup_cosine' (linear warmup, then cosine), 'step' "
                      '(x decay_factor at each of decay_epochs).',
                      check=_choices(('constant', 'cosine', 'warmup_cosine', 'step'))),
    'warmup_epochs': Field(0.0, _FLOAT, "'warmup_cosine': epochs of linear warmup from 0.",
                           check=_at_least(0)),
    'decay_epochs': Field((), _SEQ, "'step': the phase epochs at which the rate drops."),
    'decay_factor': Field(0.1, _FLOAT, "'step': the factor of each drop.", check=_positive),
    'clip_norm': Field(None, _FLOAT, 'Clip gradients to this global norm; None: no clipping.',
                       optional=True, check=_positive),
    'accumulate': Field(1, _INT, 'Accumulate the gradients of N batches per update '
                        '(optax.MultiSteps): an effective batch of N x batch_size.',
                        check=_positive),
    'epochs': Field(1, _INT, 'Epochs of this phase.', check=_at_least(0)),
    'augment': Field(True, _BOOL, 'Apply config.data.augment in this phase; False: train on '
                     'the plain images (a head-only phase can then use cached features).'),
    'early_stopping': {
        'patience': Field(0, _INT, 'Keras EarlyStopping: stop the phase after this many '
                          'epochs without improvement; 0: off.', check=_at_least(0)),
        'monitor': Field('val_loss', _STR, 'The metric early stopping watches.',
                         check=_choices(METRICS)),
        'mode': Field('auto', _STR, "'min', 'max' or 'auto' (max for accuracies, min for "
                      'losses).', check=_choices(('auto', 'min', 'max'))),
        'min_delta': Field(0.0, _FLOAT, 'The least change that counts as an improvement.',
                           check=_at_least(0)),
        'restore_best': Field(False, _BOOL, 'At the end of the phase, go back to the '
                              'parameters of its best epoch.'),
    },
    'batchnorm': Field('frozen', _STR, "'frozen': BN uses its moving statistics and never "
                       "updates them (Keras training=False); 'train': BN layers with trainable "
                       'scale/offset use batch statistics averaged over devices (from scratch).',
                       check=_choices(('frozen', 'train'))),
}


def _build(schema: dict[str, Any]) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict()
  for key, field in schema.items():
    if isinstance(field, dict):
      out[key] = _build(field)
    elif field.default is None and (len(field.types) == 1 or field.types == _FLOAT):
      # A typed placeholder, so that `--config.key=value` can override it.
      out[key] = config_dict.placeholder(field.types[0])
    elif field.default is None:  # several types (a name or a tuple): set in a config file
      out[key] = None
    else:
      out[key] = field.default
  return out


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default; `phases` holds one default phase."""
  config = _build(SCHEMA)
  config.phases = (phase(),)
  return config


def phase(**overrides: Any) -> ml_collections.ConfigDict:
  """A phase with the defaults of `PHASE_SCHEMA` and the given overrides."""
  unknown = set(overrides) - set(PHASE_SCHEMA)
  if unknown:
    key = sorted(unknown)[0]
    raise ConfigError(f'unknown phase key {key!r}{_suggest(key, PHASE_SCHEMA)}')
  out = _build(PHASE_SCHEMA)
  for key, value in overrides.items():
    if isinstance(PHASE_SCHEMA[key], dict):  # a section: override its keys, keep the rest
      unknown = set(value) - set(PHASE_SCHEMA[key])
      if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f'unknown phase key {key}.{name}{_suggest(name, PHASE_SCHEMA[key])}')
      out[key].update(dict(value))
    else:
      out[key] = value
  return out


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's argument: None (as written) or 'smoke'."""
  if arg in (None, ''):
    return config
  if arg == 'smoke':
    return smoke(config)
  raise ConfigError(f"config argument {arg!r}: expected nothing or 'smoke'")


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same workflow (backbone, head, phases, freeze specs), a few steps a phase.

  One epoch of two batches of 16 per phase, images read and used at 32x32 at most: runs on
  a CPU.
  """
  config = copy.deepcopy(config)  # keeps typed placeholders overridable from the command line
  config.batch_size = 16
  config.eval_batch_size = 16
  config.data.max_examples = 32
  if config.model.image_size is None or config.model.image_size > 32:
    config.model.image_size = 32
  if config.data.load_size is not None:
    config.data.load_size = min(config.data.load_size, 32)
  config.phases = tuple(_smoke_phase(p) for p in config.phases)
  return config


def _smoke_phase(p: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One epoch at most; schedule keys that count epochs are fitted to it."""
  values: dict[str, Any] = {'epochs': min(p.epochs, 1)}
  if p.get('schedule') == 'step':
    values.update(schedule='constant', decay_epochs=())
  if p.get('warmup_epochs'):
    values['warmup_epochs'] = 0.0
  return _with(p, **values)


def _with(cfg: ml_collections.ConfigDict, **values: Any) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(cfg)
  for key, value in values.items():
    cfg[key] = value
  return cfg


def _suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f' (did you mean {close[0]!r}?)' if close else f'; known keys: {sorted(known)}'


def _check_value(path: str, field: Field, value: Any) -> None:
  if value is None:
    if field.optional:
      return
    raise ConfigError(f'{path}: None is not allowed ({field.help})')
  ok_type = isinstance(value, field.types) and not (
      isinstance(value, bool) and bool not in field.types)
  if not ok_type:
    names = ' or '.join(t.__name__ for t in field.types)
    raise ConfigError(f'{path}={value!r}: expected {names}, got {type(value).__name__}')
  if field.check is not None:
    error = field.check(value)
    if error:
      raise ConfigError(f'{path}={value!r}: {error}')


def _check_tree(path: str, schema: dict[str, Any], cfg: Any, extra: tuple[str, ...] = ()) -> None:
  if not isinstance(cfg, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f'{path}: expected a config section, got {cfg!r}')
  for key in cfg.keys():
    if key not in schema and key not in extra:
      raise ConfigError(f'unknown config key {path}.{key}{_suggest(key, schema)}')
  for key, field in schema.items():
    value = cfg[key] if key in cfg else (None if isinstance(field, dict) else field.default)
    if isinstance(field, dict):
      _check_tree(f'{path}.{key}', field, value if value is not None else {})
    else:
      _check_value(f'{path}.{key}', field, value)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key and value; returns a complete, resolved copy with phase names set.

  Raises:
    ConfigError: naming the first offending key.
  """
  _check_tree('config', SCHEMA, config, extra=('phases',))
  phases = config.get('phases')
  if not isinstance(phases, (tuple, list)) or not phases:
    raise ConfigError('config.phases: expected a non-empty tuple of phases (fineflax.config.'
                      f'phase(...)), got {phases!r}')
  for i, p in enumerate(phases):
    _check_tree(f'config.phases[{i}]', PHASE_SCHEMA, p)
    optimizers.check_phase(phase(**dict(p)), f'config.phases[{i}].')
  weights.check_spec(config.model.get('weights'), config.model.backbone)
  for i, p in enumerate(phases):
    if p.get('augment') is False and config.data.augment.get('crop') is not None:
      raise ConfigError(f'config.phases[{i}].augment=False with config.data.augment.crop set: '
                        'a phase without augmentation cannot take random crops; drop the crop '
                        'or augment the phase')
  names = [p.get('name') or f'phase{i}' for i, p in enumerate(phases)]
  if len(set(names)) != len(names):
    raise ConfigError(f'config.phases: phase names must be unique, got {names}')

  out = default_config()
  out.update(config.copy_and_resolve_references()
             if isinstance(config, ml_collections.ConfigDict)
             else ml_collections.ConfigDict(config))
  out.phases = tuple(_with(phase(**dict(p)), name=name) for p, name in zip(phases, names))
  out.checkpoint.mode = resolve_mode(out.checkpoint.monitor, out.checkpoint.mode)
  for p in out.phases:
    p.early_stopping.mode = resolve_mode(p.early_stopping.monitor, p.early_stopping.mode)
  return out


def resolve_mode(monitor: str, mode: str) -> str:
  """'min' or 'max' for a monitored metric ('auto': max for accuracies, as Keras')."""
  if mode != 'auto':
    return mode
  return 'max' if monitor.endswith('accuracy') else 'min'


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON-able values (what a run saves as DIR/config.json)."""
  def plain(value):
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    return value
  return plain(config)


def from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """The validated config of `to_dict`'s output (a run's DIR/config.json)."""
  values = dict(values)
  phases = tuple(ml_collections.ConfigDict(p) for p in values.pop('phases', ()))
  config = ml_collections.ConfigDict(values)
  config.phases = phases
  return validate(config)


# What may change when a run is resumed: how long phases last, what is reported, how
# often it saves, where the data lives.
_RESUMABLE_CHANGES = re.compile(
    r'^(report\.|features\.|checkpoint\.(keep|every_steps)$|data\.(data_dir|manual_dir)$|'
    r'phases\[\d+\]\.epochs$|eval_batch_size$|allow_config_change$)')


def _flatten(values: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(values, dict):
    out = {}
    for key, value in values.items():
      out.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
    return out
  if prefix == 'phases':
    out = {}
    for i, p in enumerate(values):
      out.update(_flatten(p, f'phases[{i}]'))
    return out
  return {prefix: values}


def changes_on_resume(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The keys in which `config` differs from a run's saved config.json that a resume must
  not change silently, as 'key: saved -> now' (phases appended at the end are fine)."""
  old, new = _flatten(saved), _flatten(to_dict(config))
  appended = len(config.phases) > len(saved.get('phases', ()))
  out = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) == new.get(key) or _RESUMABLE_CHANGES.match(key):
      continue
    phase = re.match(r'^phases\[(\d+)\]', key)
    if appended and key not in old and phase and int(phase.group(1)) >= len(saved['phases']):
      continue
    out.append(f'{key}: {old.get(key, "(absent)")!r} -> {new.get(key, "(absent)")!r}')
  return out


_OVERRIDE = re.compile(r'^--config\.([^=]+?)(=.*)?$')
_NONE_OVERRIDE = re.compile(r'^--config\.([^=]+)=None$')
_PATH_PART = re.compile(r'^(\w+)(?:\[(\d+)\])?$')


def split_none_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`argv` without its `--config.KEY=None` flags, and their KEYs (`set_none` applies
  them): ml_collections would set the string 'None', or refuse a key whose value is None."""
  rest, keys = [], []
  for arg in argv:
    match = _NONE_OVERRIDE.match(arg)
    if match:
      keys.append(match.group(1))
    else:
      rest.append(arg)
  return rest, keys


def set_none(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Sets each of `keys` ('data.test_split', 'phases[1].clip_norm') to None in `config`;
  `validate` then refuses it where the key does not accept None."""
  for key in keys:
    node: Any = config
    parts = key.split('.')
    for i, part in enumerate(parts):
      name, index = _PATH_PART.match(part).groups()
      last = i == len(parts) - 1
      if index is not None:
        node = node[name][int(index)]
        if last:
          raise ConfigError(f'--config.{key}=None: a phase cannot be None')
      elif last:
        node[name] = None
      else:
        node = node[name]
_PHASE_KEY = re.compile(r'^phases\[(\d+)\]\.([\w.]+)$')


def check_override_flags(argv: Sequence[str]) -> None:
  """Rejects `--config.KEY=...` flags whose KEY is unknown, before absl parses them.

  (ml_collections would otherwise fail deep inside flag parsing with a bare KeyError.)
  """
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    key = match.group(1)
    phase_key = _PHASE_KEY.match(key)
    node: Any = SCHEMA
    prefix, parts = 'config', key.split('.')
    if phase_key:
      node, parts = PHASE_SCHEMA, phase_key.group(2).split('.')
      prefix = f'config.phases[{phase_key.group(1)}]'
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        known = node if isinstance(node, dict) else {}
        where = '.'.join([prefix] + parts[:i + 1])
        raise ConfigError(f'{arg}: unknown config key {where}{_suggest(part, known)}')
      node = node[part]


def reference_table() -> str:
  """The config reference as a Markdown table (docs/config_reference.md embeds it; a test
  compares)."""
  rows = ['| key | type | default | meaning |', '|---|---|---|---|']

  def add(prefix: str, schema: dict[str, Any]) -> None:
    for key, field in schema.items():
      if isinstance(field, dict):
        add(f'{prefix}{key}.', field)
        continue
      kind = field.types[0].__name__ + (' or None' if field.optional else '')
      rows.append(f'| `{prefix}{key}` | {kind} | `{field.default!r}` | {field.help} |')

  add('', SCHEMA)
  add('phases[i].', PHASE_SCHEMA)
  return '\n'.join(rows)
