"""Training: setup (`training`), the phase loop (`loop`), the data-parallel step (`step`),
the train state (`state`), freeze specs (`freeze`) and the optimizer assembled from them
(`optimizers`). `train_and_evaluate(config, workdir)` runs (or resumes) a whole run."""

from fineflax.train.training import setup, train_and_evaluate

__all__ = ['setup', 'train_and_evaluate']
