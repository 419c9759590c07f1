"""What `python scripts/benchmark.py --cost` and `--max-batch` read from a compiled step:
XLA's FLOP count and memory analysis, the largest batch that fits a memory budget, and
the table of cost records."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

logger = logging.getLogger('fineflax.benchmark')


def flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (one device's share under SPMD)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    return float(sum(a.get('flops', 0.0) for a in analysis))
  return float(analysis['flops'])


def step_bytes(compiled: Any) -> int:
  """Device memory a compiled step needs: arguments + outputs + temporaries, less the
  outputs that reuse donated arguments' buffers."""
  m = compiled.memory_analysis()
  return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def max_batch(
    memory_at: Callable[[int], int],
    budget: float,
    known: dict[int, int],
    quantum: int = 1,
    max_compiles: int = 10,
) -> int:
  """The largest multiple of `quantum` whose step needs at most `budget` bytes (0: none).

  `memory_at(b)` compiles at batch b and returns `step_bytes`; `known` holds sizes already
  measured (it is updated). Compiling every batch size is out of the question (ResNet50's
  full step takes 5-13 s to compile on a 2-core CPU), and even a bisection up to 10^5
  needs ~17 compiles. A step's memory is close to a line in the batch (a constant for the
  parameters and optimizer state, a slope for the batch and its activations), so a line
  through two measured sizes predicts the answer, and a compile at the prediction and one
  at its neighbour confirm it. The line is only roughly right (XLA reuses buffers, so
  small batches cost almost nothing extra), hence a secant search through the last two
  compiles, kept inside the bracket [fits, does not fit], which shrinks at every compile;
  when one end keeps moving it bisects, so it always ends.
  """

  def fits(b: int) -> bool:
    if b not in known:
      known[b] = memory_at(b)
    return known[b] <= budget

  lo, hi = 0, math.inf  # the largest batch known to fit, the smallest known not to
  for b in list(known):
    lo, hi = (max(lo, b), hi) if fits(b) else (lo, min(hi, b))
  moved = []  # which end each compile moved
  for _ in range(max_compiles):
    if hi - lo <= quantum:
      return lo
    # Creeping up (or down) on a bend of the curve: every 4th compile at worst bisects.
    stuck = len(moved) >= 4 and len(set(moved[-4:])) == 1
    b = _next_guess(known, budget, lo, hi, quantum, bisect=stuck)
    lo, hi, side = (b, hi, 'lo') if fits(b) else (lo, b, 'hi')
    moved.append(side)
  if hi - lo > quantum:
    logger.warning(
        'max batch: %d fits, %s does not (stopped after %d compiles)', lo, hi, max_compiles
    )
  return lo


def _next_guess(
    known: dict[int, int], budget: float, lo: int, hi: float, quantum: int, bisect: bool
) -> int:
  """A batch strictly inside (lo, hi): on the line through the last two compiles, else
  doubling (no upper end yet) or bisection."""
  guess = 2 * max(lo, quantum) if hi == math.inf else (lo + hi) / 2
  if len(known) > 1 and not bisect:
    (b1, m1), (b2, m2) = list(known.items())[-2:]
    if (m2 - m1) * (b2 - b1) > 0:
      guess = b1 + (budget - m1) * (b2 - b1) / (m2 - m1)
  b = int(min(guess, 2**40)) // quantum * quantum
  return int(min(max(b, lo + quantum), hi - quantum))


def mode_label(record: dict[str, Any]) -> str:
  """The mode of a record ('lora r=8' with its rank), '+ EMA' where its step keeps a
  moving average."""
  rank = record.get('lora_rank')
  label = record['mode'] + (f' r={rank}' if rank else '')
  return label + (' + EMA' if record.get('ema') else '')


def cost_table(records: list[dict[str, Any]]) -> str:
  """The cost records as a Markdown table (with the max batch when measured)."""
  budget = records[0].get('max_batch_gib')
  extra = f' max batch ({budget:g} GiB) |' if budget is not None else ''
  rows = [
      '| backbone | mode | batch | image | dtype | devices | GFLOP/image | x forward | '
      'trainable params | optimizer state MB | temp MB | argument MB | output MB | '
      'alias MB | compile s |' + extra,
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|' + ('---|' if extra else ''),
  ]
  for r in records:
    rows.append(
        f"| {r['backbone']} | {mode_label(r)} | {r['batch']} | {r['image']} | "
        f"{r['dtype']} | {r['devices']} {r['device_kind']} | "
        f"{r['gflop_per_image']:.4f} | {r['x_forward']:.3f} | "
        f"{r.get('trainable_params', 0):,} | {r.get('opt_state_mb', 0):,.2f} | "
        f"{r['temp_mb']:,.1f} | "
        f"{r['argument_mb']:,.1f} | {r['output_mb']:,.1f} | {r['alias_mb']:,.1f} | "
        f"{r['compile_s']} |" + (f" {r['max_batch']:,} |" if extra else '')
    )
  return '\n'.join(rows)
