"""Training: setup, the phase loop, the data-parallel step, the train state, freeze plans
and optimizers. `train_and_evaluate(config, workdir)` runs (or resumes) a whole run."""

from fineflax.train.training import setup, train_and_evaluate

__all__ = ['setup', 'train_and_evaluate']
