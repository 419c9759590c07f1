"""The keys of the weight averages a run can keep or make: `config.ema` (a moving average
of the weights during training, fineflax.train.ema) and `config.wise_ft` (WiSE-FT's
interpolation at the end of a run, fineflax.train.averaging)."""

from __future__ import annotations

from typing import Any

from fineflax.config.fields import BOOL, FLOAT, SEQ, STR, Field, fraction
from fineflax.config.registry import choices


def _alphas(v: Any) -> str | None:
  if not v or not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in v):
    return 'must be a non-empty tuple of numbers in [0, 1]'
  return None


AVERAGING_SCHEMA: dict[str, Any] = {
    'ema': {
        'decay': Field(
            None,
            FLOAT,
            'Keep an exponential moving average of the trainable parameters with this '
            'decay (e.g. 0.999), evaluated beside them after every epoch (val_*_ema); '
            'None: off.',
            optional=True,
            check=fraction,
        ),
        'warmup': Field(
            True,
            BOOL,
            "Decay min(decay, (1 + t) / (10 + t)) at the t-th update, as TensorFlow's "
            'ExponentialMovingAverage with num_updates; False: `decay` from the first.',
        ),
        'scope': Field(
            'run',
            STR,
            "'run': one average over every phase (leaves that start training join it at "
            "their value); 'phase': a new average from each phase's start.",
            check=choices(('run', 'phase')),
        ),
    },
    'wise_ft': {
        'enabled': Field(
            False,
            BOOL,
            'After the last phase, interpolate the weights between the end of '
            'wise_ft.start and the final (or best) ones, choose alpha on the validation '
            'split, test it once (checkpoints/wise_ft/, results.json). '
            'python -m fineflax.interpolate does the same on a finished run.',
        ),
        'start': Field(
            None,
            STR,
            'The phase whose end is alpha 0 (its name); None: the first phase (the head '
            'phase of a linear-probe-then-fine-tune run).',
            optional=True,
        ),
        'end': Field(
            'final',
            STR,
            "Alpha 1: the 'final' parameters, or the 'best' checkpoint.",
            check=choices(('final', 'best')),
        ),
        'alphas': Field(
            (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            SEQ,
            'The alphas evaluated: (1 - alpha) * start + alpha * end.',
            check=_alphas,
        ),
    },
}
