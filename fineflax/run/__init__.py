"""The run folder: what a run writes, where, and how it is read back."""

from fineflax.run.layout import RunDir

__all__ = ['RunDir']
