"""The keys of each of `config.phases`: default, accepted types, meaning and value check
(`PHASE_SCHEMA`), and `phase()`, which config files build their phases with."""

from __future__ import annotations

from typing import Any

import ml_collections

from fineflax.config.fields import (
    BOOL,
    FLOAT,
    INT,
    METRICS,
    SEQ,
    STR,
    Field,
    at_least,
    build,
    fraction,
    positive,
    suggest,
)
from fineflax.config.registry import choices, value_check
from fineflax.errors import ConfigError

PHASE_SCHEMA: dict[str, Any] = {
    'name': Field('', STR, "Phase name in logs and metrics; '': 'phase<i>'."),
    'freeze': Field(
        'none',
        STR,
        "What is frozen: 'none', 'backbone', 'layers[A:B]' "
        "(Keras layer slice), 'stages[A:B]' (slice of the backbone's stages, as "
        "layer_decay counts them: 'stages[:-1]' leaves the last stage and the "
        "head trainable, whatever the backbone), 'regex:PATTERN' (parameter "
        "paths), or what trains: 'norm', 'bias', 'head', 'lora' (the adapters of "
        "config.model.lora) joined by '+' ('norm+head').",
        check=value_check('phases.freeze'),
    ),
    'lr_groups': Field(
        None,
        SEQ,
        'Discriminative learning rates: (spec, multiplier) pairs, '
        "the spec as freeze's or 'head'; a parameter trains at learning_rate x "
        'the multiplier of the first pair that matches it (none: 1), times '
        'its layer_decay factor; 0 freezes it as freeze does. The freeze spec '
        'wins over both. None: every parameter at 1.',
        optional=True,
    ),
    'layer_decay': Field(
        None,
        FLOAT,
        'Layer-wise decay d: a backbone parameter k stages '
        'below the head trains at learning_rate x d**k (stages: ResNet '
        'stem, conv2..conv5; VGG16 block1..block5; Xception entry, middle, '
        'exit); times its lr_groups multiplier; None: off.',
        optional=True,
        check=lambda v: None if 0 < v <= 1 else 'must be in (0, 1]',
    ),
    'fit': Field(
        None,
        STR,
        "Fit the head exactly instead of training it: 'logistic' (L2 logistic "
        "regression, L-BFGS) or 'ridge' (least squares to +-1 one-hot targets, closed "
        "form) on the frozen backbone's features; one pass, the backbone untouched, "
        'the optimizer keys unused (fineflax.train.linear_probe). None: train.',
        optional=True,
        check=value_check('phases.fit'),
    ),
    'fit_l2': Field(
        (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        SEQ,
        "fit's L2 strengths: the one with the best validation accuracy is kept "
        '(one value: no choice, and no validation split needed).',
        check=lambda v: (
            None
            if v and all(isinstance(x, (int, float)) and x > 0 for x in v)
            else 'must be a non-empty sequence of positive numbers'
        ),
    ),
    'optimizer': Field(
        'adam',
        STR,
        "Keras' update rule: 'adam', 'adamw', 'sgd' or 'rmsprop' " '(fineflax.train.update_rules).',
        check=value_check('phases.optimizer'),
    ),
    'learning_rate': Field(1e-3, FLOAT, 'Learning rate.', check=positive),
    'momentum': Field(0.0, FLOAT, 'Momentum of sgd and rmsprop; 0: none.', check=fraction),
    'nesterov': Field(False, BOOL, 'Nesterov momentum (sgd).'),
    'weight_decay': Field(
        None,
        FLOAT,
        'Decoupled weight decay (x learning rate, as Keras '
        'and optax.adamw apply it) of the trainable kernels and biases; '
        'None: 1e-4 for adamw, 0 otherwise.',
        optional=True,
        check=at_least(0),
    ),
    'decay_batchnorm': Field(False, BOOL, 'Also decay BatchNormalization scale/offset.'),
    'schedule': Field(
        'constant',
        STR,
        "Learning rate schedule over the phase: 'constant', "
        "'cosine' (to 0), 'warmup_cosine' (linear warmup, then cosine), 'step' "
        '(x decay_factor at each of decay_epochs).',
        check=value_check('phases.schedule'),
    ),
    'warmup_epochs': Field(
        0.0, FLOAT, "'warmup_cosine': epochs of linear warmup from 0.", check=at_least(0)
    ),
    'decay_epochs': Field((), SEQ, "'step': the phase epochs at which the rate drops."),
    'decay_factor': Field(0.1, FLOAT, "'step': the factor of each drop.", check=positive),
    'clip_norm': Field(
        None,
        FLOAT,
        'Clip gradients to this global norm; None: no clipping.',
        optional=True,
        check=positive,
    ),
    'accumulate': Field(
        1,
        INT,
        'Accumulate the gradients of N batches per update '
        '(optax.MultiSteps): an effective batch of N x batch_size.',
        check=positive,
    ),
    'epochs': Field(1, INT, 'Epochs of this phase.', check=at_least(0)),
    'augment': Field(
        True,
        BOOL,
        'Apply config.data.augment in this phase; False: train on '
        'the plain images (a head-only phase can then use cached features).',
    ),
    'early_stopping': {
        'patience': Field(
            0,
            INT,
            'Keras EarlyStopping: stop the phase after this many '
            'epochs without improvement; 0: off.',
            check=at_least(0),
        ),
        'monitor': Field(
            'val_loss', STR, 'The metric early stopping watches.', check=choices(METRICS)
        ),
        'mode': Field(
            'auto',
            STR,
            "'min', 'max' or 'auto' (max for accuracies, min for " 'losses).',
            check=choices(('auto', 'min', 'max')),
        ),
        'min_delta': Field(
            0.0, FLOAT, 'The least change that counts as an improvement.', check=at_least(0)
        ),
        'restore_best': Field(
            False, BOOL, 'At the end of the phase, go back to the ' 'parameters of its best epoch.'
        ),
    },
    'batchnorm': Field(
        'frozen',
        STR,
        "'frozen': BN uses its moving statistics and never "
        "updates them (Keras training=False); 'train': BN layers with trainable "
        'scale/offset use batch statistics averaged over devices (from scratch).',
        check=value_check('phases.batchnorm'),
    ),
}


def phase(**overrides: Any) -> ml_collections.ConfigDict:
  """A phase with the defaults of `PHASE_SCHEMA` and the given overrides."""
  unknown = set(overrides) - set(PHASE_SCHEMA)
  if unknown:
    key = sorted(unknown)[0]
    raise ConfigError(f'unknown phase key {key!r}{suggest(key, PHASE_SCHEMA)}')
  out = build(PHASE_SCHEMA)
  for key, value in overrides.items():
    if isinstance(PHASE_SCHEMA[key], dict):  # a section: override its keys, keep the rest
      unknown = set(value) - set(PHASE_SCHEMA[key])
      if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f'unknown phase key {key}.{name}{suggest(name, PHASE_SCHEMA[key])}')
      out[key].update(dict(value))
    else:
      out[key] = value
  return out
