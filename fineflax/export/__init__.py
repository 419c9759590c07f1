"""A fine-tuned run out of JAX: its serving function (`make_serving`), BatchNormalization
folding (`fold_batchnorm`) and the export formats (`export`, FORMATS); the program is
fineflax/cli/export.py (`python -m fineflax.export`)."""

from fineflax.export.exporter import FORMATS, TOLERANCE, Report, export
from fineflax.export.folding import fold_batchnorm
from fineflax.export.serving import Serving, make_serving

__all__ = ['FORMATS', 'TOLERANCE', 'Report', 'Serving', 'export', 'fold_batchnorm', 'make_serving']
