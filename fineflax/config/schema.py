"""Every config key but the phases': its default, accepted types, meaning and value check
(`SCHEMA`; each of `config.phases` is described by `phase_schema.PHASE_SCHEMA`), and the
default config built from them.

A config file starts from `default_config()`, sets what it needs, builds its phases with
`phase()`, and ends with `finish(config, arg)` (fineflax.config.smoke) so that every
config accepts the `:smoke` argument.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from fineflax.config.averaging_schema import AVERAGING_SCHEMA
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
    class_weight,
    crop,
    fraction,
    hidden_widths,
    positive,
)
from fineflax.config.phase_schema import phase
from fineflax.config.registry import choices, value_check

SCHEMA: dict[str, Any] = {
    'seed': Field(0, INT, 'Seed of parameter init, data order and dropout.'),
    'batch_size': Field(
        64, INT, 'Global training batch size (all devices, all hosts).', check=positive
    ),
    'eval_batch_size': Field(
        None, INT, 'Evaluation batch size; None: batch_size.', optional=True, check=positive
    ),
    'dtype': Field(
        'auto',
        STR,
        "Compute dtype; 'auto': bfloat16 on GPU/TPU, float32 on "
        'CPU. Parameters are float32 always.',
        check=value_check('dtype'),
    ),
    'model': {
        'backbone': Field(
            'resnet50',
            STR,
            'Backbone name (fineflax.models.BACKBONES).',
            check=value_check('model.backbone'),
        ),
        'weights': Field(
            None,
            STR,
            "Pretrained weights: None (random init), 'imagenet' (the "
            "backbone's default), a source name ('keras:imagenet', "
            "'torchvision:IMAGENET1K_V2') or a .h5/.pth/.pt/.safetensors path.",
            optional=True,
        ),
        'include_top': Field(
            False,
            BOOL,
            "Keep Keras' ImageNet classifier (avg_pool + "
            'predictions; VGG16: flatten, fc1, fc2, predictions) as the head '
            'instead of config.model.head.',
        ),
        'num_classes': Field(
            None,
            INT,
            'Output units (1: binary, sigmoid); None: the ' "dataset's number of classes.",
            optional=True,
            check=positive,
        ),
        'image_size': Field(
            None,
            INT,
            'Side the images are resized to on the device; ' 'None: the size the data comes in.',
            optional=True,
            check=positive,
        ),
        'preprocessing': Field(
            'auto',
            STR,
            "Input normalisation: 'caffe', 'tf' ([-1, 1]),"
            " 'torch' (mean/std), 'raw' ([0, 255]: Keras' ConvNeXt normalises inside); "
            "'auto': the backbone's.",
            check=value_check('model.preprocessing'),
        ),
        'drop_path': Field(
            0.0,
            FLOAT,
            'Stochastic depth. ConvNeXt and ViT: the drop rate of the last residual block, '
            "rising linearly from 0 at the first (Keras' drop_path_rate). EfficientNet "
            "and V2: Keras' drop_connect_rate, block b of n dropping at rate * b / n "
            "(Keras' default 0.2; 0 here, as for ConvNeXt). Drawn per example, in the "
            'blocks that train; 0: none.',
            check=fraction,
        ),
        'dropout': Field(
            0.0,
            FLOAT,
            "The backbone's own dropout (ViT: torchvision's `dropout`, after the position "
            'embedding, the attention and in the MLP); drawn per example; 0: none.',
            check=fraction,
        ),
        'head': {
            'pooling': Field(
                'avg',
                STR,
                "'avg', 'max' (global pooling) or 'flatten'.",
                check=value_check('model.head.pooling'),
            ),
            'hidden': Field((), SEQ, 'Widths of hidden Dense layers.', check=hidden_widths),
            'activation': Field(
                'relu',
                STR,
                "Activation of the hidden Dense layers: 'relu' "
                "or 'linear' (Deep Learning with Python's Dense(256) has none).",
                check=value_check('model.head.activation'),
            ),
            'dropout': Field(
                0.0, FLOAT, 'Dropout rate before the classifier; 0: none.', check=fraction
            ),
            'batchnorm': Field(False, BOOL, 'BatchNormalization before the classifier.'),
        },
        'lora': {
            'rank': Field(
                0,
                INT,
                'LoRA adapters: the rank r of W + (alpha / r) * A @ B on each targeted '
                'convolution and dense kernel of the backbone; their factors and the head '
                'train, the base weights stay frozen (docs/running.md); 0 or None: no '
                'adapters.',
                optional=True,
                check=at_least(0),
            ),
            'alpha': Field(
                None,
                FLOAT,
                'LoRA scale numerator: the adapters are scaled by alpha / rank (as peft); '
                'None: alpha = rank.',
                optional=True,
                check=positive,
            ),
            'target': Field(
                '^backbone/',
                STR,
                "Regex (re.search) over kernel paths ('backbone/conv1_conv/kernel') of the "
                'layers that get adapters: Conv2D of one group and Dense; the default: every '
                "one of the backbone (a ViT: its MLPs' Dense layers).",
                check=value_check('model.lora.target'),
            ),
        },
    },
    'data': {
        'source': Field(
            'digits',
            STR,
            "'digits' (the demo's), 'tfds:NAME' "
            "(tensorflow-datasets), 'folder:PATH' (a folder per class) or "
            "'synthetic:N:SIDE' (random images, for benchmarks).",
            check=value_check('data.source'),
        ),
        'train_split': Field('train', STR, 'Split to train on.'),
        'val_split': Field(
            'validation', STR, 'Split evaluated after every epoch; None: ' 'none.', optional=True
        ),
        'test_split': Field('test', STR, 'Split evaluated at the end; None: none.', optional=True),
        'max_examples': Field(
            None,
            INT,
            'Keep the first N examples of each split (smoke ' 'runs); None: all.',
            optional=True,
            check=positive,
        ),
        'load_size': Field(
            None,
            INT,
            'Side images are resized to as they are read (photos '
            'of varying size); None: as stored.',
            optional=True,
            check=positive,
        ),
        'validation_split': Field(
            0.0,
            FLOAT,
            'folder: the fraction of the images carved ' 'out as the validation split.',
            check=fraction,
        ),
        'split_seed': Field(1337, INT, 'folder: seed of the shuffle before the carve.'),
        'data_dir': Field(
            None,
            STR,
            "tfds: where datasets are prepared; None: tfds' " 'default (~/tensorflow_datasets).',
            optional=True,
        ),
        'manual_dir': Field(
            None,
            STR,
            'tfds: where the files a dataset is built from are ' 'put by hand (offline).',
            optional=True,
        ),
        'pipeline': Field(
            'auto',
            STR,
            "How splits are read: 'memory' (decoded into host "
            "memory before training), 'stream' (decoded batch by batch as training "
            "runs, in data.workers processes; folder: sources); 'auto': memory when "
            'the decoded splits fit under data.memory_max_mb, else stream.',
            check=value_check('data.pipeline'),
        ),
        'memory_max_mb': Field(
            16384,
            INT,
            "'auto': the decoded size (all splits, this "
            'process) up to which splits are held in memory.',
            check=at_least(0),
        ),
        'workers': Field(
            None,
            INT,
            'Streaming: decoding processes; None: one per core (up '
            'to 16); 0: threads of the training process.',
            optional=True,
            check=at_least(0),
        ),
        'jpeg_draft': Field(
            True,
            BOOL,
            "Streaming, augment.crop='random_resized': decode "
            'a JPEG at 1/2, 1/4 or 1/8 scale when its training crop stays at '
            'least load_size on each side, and reduce large shrinks of '
            "training crops first (Pillow's reducing_gap=2) (faster; pixels "
            'within about 1 level; evaluation exact).',
        ),
        'device_resident': Field(
            True,
            BOOL,
            'Place the splits on every device once when ' 'they fit, and gather batches there.',
        ),
        'device_resident_max_mb': Field(
            4096,
            INT,
            'The size (all splits) up to which they ' 'are placed on the devices.',
            check=at_least(0),
        ),
        'augment': {
            'flip': Field(
                'none',
                STR,
                "Keras RandomFlip: 'horizontal', 'vertical', "
                "'horizontal_and_vertical' or 'none'.",
                check=value_check('data.augment.flip'),
            ),
            'rotation': Field(
                0.0,
                FLOAT,
                'Keras RandomRotation factor: a fraction of a full '
                'turn (0.1: up to 36 degrees either way).',
                check=fraction,
            ),
            'zoom': Field(
                0.0,
                FLOAT,
                'Keras RandomZoom factor: zoom in or out by up to this ' 'fraction.',
                check=fraction,
            ),
            'translate': Field(
                0.0,
                FLOAT,
                'Keras RandomTranslation factor: shift by up to ' 'this fraction of the side.',
                check=fraction,
            ),
            'crop': Field(
                None,
                (int, str),
                'Keras RandomCrop side, taken from the stored '
                'image before the resize (evaluation: centre crop); or '
                "'random_resized': an Inception-style crop of the original image, "
                'on the host as it is read (streamed splits; evaluation: the '
                'centred square of 0.875 of the shorter side).',
                optional=True,
                check=crop,
            ),
            'fill_mode': Field(
                'reflect',
                STR,
                'What fills pixels from outside the image.',
                check=value_check('data.augment.fill_mode'),
            ),
            'fill_value': Field(0.0, FLOAT, "The fill with fill_mode 'constant'."),
            'mixup': Field(
                0.0, FLOAT, 'Mixup alpha (Beta(alpha, alpha) weights); 0: off.', check=at_least(0)
            ),
        },
    },
    'loss': {
        'label_smoothing': Field(
            0.0, FLOAT, 'Label smoothing of the softmax loss.', check=fraction
        ),
        'class_weight': Field(
            None,
            (str, tuple, list),
            "Keras class_weight: 'balanced' "
            '(n_examples / (n_classes * n_class) from the train split) or '
            'one weight per class; None: all 1.',
            optional=True,
            check=class_weight,
        ),
    },
    'features': {
        'cache': Field(
            'auto',
            STR,
            'Cached-feature mode for phases that train only the head '
            "without augmentation: 'auto' (in memory up to features.memory_mb, "
            "else on disk under DIR/features), 'memory', 'disk' or 'off'.",
            check=value_check('features.cache'),
        ),
        'memory_mb': Field(
            2048,
            INT,
            "'auto': the size up to which features are held in " 'memory.',
            check=at_least(0),
        ),
    },
    'report': {
        'progress': Field(
            'auto',
            STR,
            "Per-epoch progress: 'bar' (a terminal bar), 'lines' "
            "(plain lines), 'off'; 'auto': a bar on a TTY, lines otherwise.",
            check=value_check('report.progress'),
        ),
        'tensorboard': Field(True, BOOL, 'Write TensorBoard event files under DIR/tb.'),
        'plot': Field(True, BOOL, 'Redraw DIR/history.png after every epoch.'),
        'every_steps': Field(
            None,
            INT,
            'Also record the training loss, accuracy, learning '
            'rate and images/s of every N steps (metrics.jsonl, "kind": '
            '"step"; TensorBoard step/); None: per epoch only.',
            optional=True,
            check=positive,
        ),
    },
    'checkpoint': {
        'keep': Field(
            3, INT, 'How many of the latest checkpoints to keep (latest/).', check=positive
        ),
        'every_steps': Field(
            None,
            INT,
            'Also save every N steps (besides every epoch and '
            'on SIGTERM); None: per epoch only.',
            optional=True,
            check=positive,
        ),
        'monitor': Field(
            'val_loss', STR, 'The metric best/ keeps the best of.', check=choices(METRICS)
        ),
        'mode': Field(
            'auto',
            STR,
            "'min' or 'max': which value of `monitor` is best; "
            "'auto': max for accuracies, min for losses.",
            check=choices(('auto', 'min', 'max')),
        ),
    },
    **AVERAGING_SCHEMA,
    'allow_config_change': Field(
        False,
        BOOL,
        'Resume a workdir whose config.json differs '
        'in more than epochs, appended phases, reporting and '
        'checkpoint cadence (refused otherwise).',
    ),
    'init_from': Field(
        None,
        STR,
        "Start from another run's parameters: its workdir, a "
        'checkpoint step folder or a converted checkpoint; layers of '
        'another shape (a new head) are initialised and reported.',
        optional=True,
    ),
    'init_from_weights': Field(
        'raw',
        STR,
        "Which weights of an init_from run: 'raw' (its parameters) or 'ema' (their moving "
        'average, config.ema, held in the same checkpoint).',
        check=choices(('raw', 'ema')),
    ),
}


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default; `phases` holds one default phase."""
  config = build(SCHEMA)
  config.phases = (phase(),)
  return config
