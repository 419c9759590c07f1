"""Evaluates a checkpoint of a run on one split; the program is fineflax/cli/evaluate.py.

  python -m fineflax.evaluate --workdir DIR [--split train|val|test|NAME]
                              [--checkpoint best|latest|STEP] [--batch_size N]

  prints a table (loss, accuracy, per class, confusion matrix) and writes it under DIR/eval/.
  --coordinator HOST:PORT --num_processes N --process_id I
                            one process of a multi-host job (docs/multihost.md)
"""

from fineflax.cli import evaluate

if __name__ == '__main__':
  evaluate.main()
