"""Trains a run, or resumes it; the program is fineflax/cli/train.py.

  python -m fineflax.train --config CONFIG[:smoke] --workdir DIR [--config.KEY=VALUE ...]

  --config CONFIG[:smoke]   the experiment, a config file (configs/*.py); ':smoke' runs the
                            same workflow for a few steps a phase
  --config.KEY=VALUE        overrides one key: --config.batch_size=32,
                            --config.phases[1].learning_rate=1e-4, --config.data.test_split=None
                            (every key: docs/config_reference.md)
  --workdir DIR             the run folder; the same command again resumes the run there
  --coordinator HOST:PORT --num_processes N --process_id I
                            one process of a multi-host job (docs/multihost.md)
"""

from fineflax.cli import train

train.main()
