"""Configs: defaults, validation errors that name the key, the :smoke argument."""

import jax
import pytest

from fineflax import config as config_lib, models
from fineflax.distributed import parallel
from fineflax.errors import ConfigError
from tests import helpers


def _config(**top):
  cfg = config_lib.default_config()
  for key, value in top.items():
    cfg[key] = value
  return cfg


def test_defaults_validate_and_are_complete():
  cfg = config_lib.validate(config_lib.default_config())
  assert cfg.model.backbone == 'resnet50' and cfg.phases[0].name == 'phase0'
  assert cfg.model.weights is None and cfg.phases[0].batchnorm == 'frozen'


@pytest.mark.parametrize(
    'mutate, message',
    [
        (
            lambda c: setattr(c, 'batchsize', 3),
            "unknown config key config.batchsize (did you mean 'batch_size'?)",
        ),
        (
            lambda c: setattr(c.model, 'hed', 1),
            "unknown config key config.model.hed (did you mean 'head'?)",
        ),
        (
            lambda c: setattr(c.model.head, 'pooling', 'mean'),
            "config.model.head.pooling='mean': expected one of ['avg', 'flatten', 'max']",
        ),
        (lambda c: setattr(c.model, 'backbone', 'resnet51'), "config.model.backbone='resnet51'"),
        (
            lambda c: setattr(c, 'batch_size', True),
            'config.batch_size=True: expected int, got bool',
        ),
        (lambda c: setattr(c, 'batch_size', 0), 'config.batch_size=0: must be > 0'),
        (
            lambda c: setattr(c.model.head, 'dropout', 1.0),
            'config.model.head.dropout=1.0: must be in',
        ),
        (lambda c: setattr(c.model.head, 'hidden', (256, -1)), 'config.model.head.hidden'),
        (
            lambda c: setattr(c.model, 'weights', 'timm:resnet50'),
            "config.model.weights='timm:resnet50': no such weights for backbone 'resnet50'",
        ),
        (
            lambda c: (
                setattr(c.model, 'backbone', 'resnet_tiny'),
                setattr(c.model, 'weights', 'imagenet'),
            ),
            "config.model.weights='imagenet': no such weights for backbone 'resnet_tiny'; "
            'it has no named weights',
        ),
        (
            lambda c: setattr(c.data, 'source', 'tfds'),
            "config.data.source='tfds': expected " "'tfds:NAME'",
        ),
        (
            lambda c: setattr(c.data, 'source', 'hub:x'),
            "config.data.source='hub:x': unknown source",
        ),
        (lambda c: setattr(c.data.augment, 'flip', 'both'), "config.data.augment.flip='both'"),
        (lambda c: setattr(c, 'phases', ()), 'config.phases: expected a non-empty tuple'),
        (
            lambda c: setattr(
                c, 'phases', (config_lib.phase(name='a'), config_lib.phase(name='a'))
            ),
            'phase names must be unique',
        ),
        (
            lambda c: setattr(c, 'phases', (config_lib.phase(freeze='layers[143]'),)),
            "config.phases[0].freeze='layers[143]'",
        ),
        (
            lambda c: setattr(
                c, 'phases', (config_lib.phase(), config_lib.phase(learning_rate=-1.0))
            ),
            'config.phases[1].learning_rate=-1.0: must be > 0',
        ),
        (
            lambda c: setattr(c, 'phases', (config_lib.phase(optimizer='adagrad'),)),
            "config.phases[0].optimizer='adagrad'",
        ),
    ],
)
def test_bad_configs_name_the_key(mutate, message):
  cfg = config_lib.default_config()
  mutate(cfg)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(cfg)
  assert message in str(error.value)


def test_unknown_phase_key():
  with pytest.raises(ConfigError, match="unknown phase key 'epoch' \\(did you mean 'epochs'"):
    config_lib.phase(epoch=3)


def test_override_flags_are_checked_before_parsing():
  config_lib.check_override_flags(
      [
          '--config=c.py',
          '--config.model.head.dropout=0.1',
          '--config.phases[1].epochs=3',
          '--workdir=x',
      ]
  )
  with pytest.raises(ConfigError, match=r"config\.model\.heads \(did you mean 'head'"):
    config_lib.check_override_flags(['--config.model.heads.dropout=0.1'])
  with pytest.raises(ConfigError, match=r'unknown config key config.phases\[0\].lr'):
    config_lib.check_override_flags(['--config.phases[0].lr=0.1'])
  config_lib.check_override_flags(['--config.phases[1].early_stopping.patience=5'])
  with pytest.raises(
      ConfigError, match=r'config.phases\[1\].early_stopping.patiense \(did ' "you mean 'patience'"
  ):
    config_lib.check_override_flags(['--config.phases[1].early_stopping.patiense=5'])


def test_smoke_keeps_the_workflow_and_shrinks_it():
  cfg = config_lib.default_config()
  cfg.model.image_size = 224
  cfg.model.head.batchnorm = True
  cfg.phases = (
      config_lib.phase(name='head', freeze='backbone', epochs=10),
      config_lib.phase(name='conv5', freeze='layers[:143]', epochs=50),
  )
  smoke = config_lib.validate(config_lib.finish(cfg, 'smoke'))
  assert smoke.model.backbone == cfg.model.backbone and smoke.model.head.batchnorm
  assert [(p.name, p.freeze, p.epochs) for p in smoke.phases] == [
      ('head', 'backbone', 1),
      ('conv5', 'layers[:143]', 1),
  ]
  assert smoke.model.image_size == 32 and smoke.data.max_examples == 32
  assert cfg.phases[1].epochs == 50  # the original is untouched
  with pytest.raises(ConfigError, match="config argument 'fast'"):
    config_lib.finish(cfg, 'fast')


def test_num_classes_must_fit_the_dataset():
  cfg = config_lib.default_config()
  names = tuple('abc')
  assert models.resolve_num_classes(cfg.model, names) == 3
  cfg.model.num_classes = 2
  with pytest.raises(ConfigError, match='num_classes=2 but the dataset has 3 classes'):
    models.resolve_num_classes(cfg.model, names)
  cfg.model.num_classes = 1
  with pytest.raises(ConfigError, match='num_classes=1 .* dataset has 3 classes'):
    models.resolve_num_classes(cfg.model, names)
  assert models.resolve_num_classes(cfg.model, ('cat', 'dog')) == 1


def test_batch_size_must_split_over_devices():
  mesh = parallel.make_mesh(jax.devices()[:8])
  parallel.check_batch_size(64, mesh)
  with pytest.raises(ValueError, match='config.batch_size=12 does not split evenly over 8'):
    parallel.check_batch_size(12, mesh)


def test_docs_config_reference_is_current():
  page = (helpers.ROOT / 'docs' / 'config_reference.md').read_text()
  assert (
      config_lib.reference_table() in page
  ), 'docs/config_reference.md is stale: paste fineflax.config.reference_table() into it'


def test_auto_mode_follows_the_monitored_metric():
  cfg = config_lib.default_config()
  cfg.checkpoint.monitor = 'val_accuracy'
  cfg.phases = (
      config_lib.phase(early_stopping={'patience': 2}),
      config_lib.phase(name='b', early_stopping={'monitor': 'accuracy'}),
      config_lib.phase(name='c', early_stopping={'monitor': 'val_accuracy', 'mode': 'min'}),
  )
  out = config_lib.validate(cfg)
  assert out.checkpoint.mode == 'max'
  assert [p.early_stopping.mode for p in out.phases] == ['min', 'max', 'min']


def test_smoke_fits_epoch_counted_schedules_into_one_epoch():
  cfg = config_lib.default_config()
  cfg.phases = (
      config_lib.phase(optimizer='sgd', epochs=10, schedule='step', decay_epochs=(3, 6)),
      config_lib.phase(name='b', epochs=10, schedule='warmup_cosine', warmup_epochs=2.0),
  )
  config_lib.validate(cfg)
  smoke = config_lib.validate(config_lib.smoke(cfg))
  assert [(p.epochs, p.schedule) for p in smoke.phases] == [(1, 'constant'), (1, 'warmup_cosine')]
  assert smoke.phases[1].warmup_epochs == 0


def test_config_json_round_trip():
  import json  # pylint: disable=g-import-not-at-top

  cfg = config_lib.default_config()
  cfg.model.head.hidden = (32, 16)
  cfg.loss.class_weight = (1.0, 2.0)
  cfg.phases = (
      config_lib.phase(name='a', early_stopping={'patience': 3}),
      config_lib.phase(name='b', freeze='backbone', decay_epochs=()),
  )
  resolved = config_lib.validate(cfg)
  back = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(resolved))))
  assert config_lib.to_dict(back) == config_lib.to_dict(resolved)
  assert back.phases[0].early_stopping.patience == 3
  assert list(back.model.head.hidden) == [32, 16]


def test_a_run_saved_before_a_key_existed_resumes_with_the_key_at_its_default():
  """config.json of an earlier version lacks keys added since (model.drop_path): at their
  defaults they are no change; set otherwise they are one."""
  cfg = config_lib.validate(config_lib.default_config())
  saved = config_lib.to_dict(cfg)
  del saved['model']['drop_path']
  assert config_lib.changes_on_resume(saved, cfg) == []
  cfg.model.drop_path = 0.1
  assert config_lib.changes_on_resume(saved, cfg) == ['model.drop_path: 0.0 -> 0.1']
