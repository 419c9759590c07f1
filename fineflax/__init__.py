"""fineflax: fine-tuning ImageNet-pretrained classifiers with JAX and Flax.

From Python, a finished run is one call away:

    import fineflax
    run = fineflax.load_run('runs/demo')        # model, variables, config, class names
    probs = fineflax.predict_fn(run)(images)    # uint8 images of any size -> probabilities

Training is `python -m fineflax.train --config configs/cifar10.py --workdir runs/x`, or
`fineflax.train.train_and_evaluate(config, workdir)`.
"""

# The packages that register config checks (fineflax.config.registry) are imported with
# the package, so that validation always has them.
from fineflax import data, models, train, weights  # noqa: F401
from fineflax.inference.arrays import predict_fn
from fineflax.run.restore import RestoredRun, load_run

__all__ = ['RestoredRun', 'load_run', 'predict_fn']
