r"""Compares training runs side by side from their held-out eval histories.

  python -m tuna2_jax.compare DIR_A DIR_B ... --out REPORT_DIR [--thresholds=0.5,0.8]

Each DIR is a training workdir with config.json and eval_history.jsonl (written when
eval.metrics_every > 0). Runs are grouped into arms by config key ablation.arm (else by the
workdir's name, or its parent's for .../seedN workdirs); the runs of an arm are its seeds.
REPORT_DIR gets, per metric, `<metric>.png` (the metric against steps and against training
FLOPs: mean over seeds with the min-max spread shaded), `report.md` (final and best values and
the steps, and FLOPs, at which the mean first reaches each threshold) and `summary.json` (the
same numbers). Runs whose configs differ in more than the ablated keys (config key
ablation.varies, plus --ablated; seeds always; the seeds of one arm only in the seed and in
per-seed paths), or whose evaluation sets differ, produce a warning listing the differences,
printed and written at the top of report.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Sequence

import numpy as np
from absl import app, flags

from tuna2_jax import checkpoint as ckpt_lib
from tuna2_jax import cli
from tuna2_jax.config_history import flatten
from tuna2_jax.evaluate import HISTORY_FILE

ALWAYS_DIFFERENT = ('seed',)  # the seeds of an arm, and of the arms, differ by design
_SEED_DIR = re.compile(r'^seed\d+$')
_SKIPPED_METRICS = re.compile(r'_baseline$')  # constants, not curves
_NUMBER = re.compile(r'\d+')


class Run:
  def __init__(self, workdir: str):
    self.workdir = workdir
    config_text = ckpt_lib.read_config(workdir)
    if config_text is None:
      raise FileNotFoundError(f'{workdir!r} has no {ckpt_lib.CONFIG_FILE}: not a training workdir')
    self.config = json.loads(config_text)
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{workdir!r} has no {HISTORY_FILE}; train it with '
                              '--config.eval.metrics_every=N to record one')
    by_step = {}
    with open(path) as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          by_step[int(record['step'])] = record  # a resumed run may repeat a step: keep the last
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f'{path}:{i}: not an eval-history line ({e})') from None
    if not by_step:
      raise ValueError(f'{path} holds no evaluations')
    self.history = [by_step[s] for s in sorted(by_step)]
    arm = (self.config.get('ablation') or {}).get('arm')
    name = os.path.basename(os.path.normpath(workdir))
    if not arm and _SEED_DIR.match(name):
      name = os.path.basename(os.path.dirname(os.path.normpath(workdir)))
    self.arm = arm or name

  def metric_names(self) -> set[str]:
    return {k for r in self.history for k, v in r.items()
            if k.startswith('shapes/') and isinstance(v, (int, float))
            and not _SKIPPED_METRICS.search(k)}


def _same(a, b) -> bool:
  """Equal, or strings equal but for their numbers (per-seed paths such as .../seed0)."""
  if a == b:
    return True
  return isinstance(a, str) and isinstance(b, str) and _NUMBER.sub('#', a) == _NUMBER.sub('#', b)


def config_differences(a: dict, b: dict, allowed: Sequence[str]) -> list[str]:
  """'key: A vs B' for every flattened config key where a and b differ, outside `allowed`."""
  fa, fb = flatten(a), flatten(b)
  return [f'{k}: {fa.get(k, "<absent>")!r} vs {fb.get(k, "<absent>")!r}'
          for k in sorted(fa.keys() | fb.keys())
          if k not in allowed and not _same(fa.get(k, '<absent>'), fb.get(k, '<absent>'))]


def consistency_warnings(runs: Sequence[Run], ablated: Sequence[str] = ()) -> list[str]:
  """Config differences beyond the ablated keys, and differing evaluation sets.

  The seeds of one arm may differ only in the seed (and in per-seed paths); arms may differ in
  the ablated keys too.
  """
  allowed = set(ALWAYS_DIFFERENT) | set(ablated)
  for r in runs:
    allowed |= set((r.config.get('ablation') or {}).get('varies') or ())
  firsts: dict[str, Run] = {}
  pairs = []
  for r in runs:
    if r.arm in firsts:
      pairs.append((firsts[r.arm], r, ALWAYS_DIFFERENT))
    else:
      if firsts:
        pairs.append((runs[0], r, tuple(allowed)))
      firsts[r.arm] = r
  warnings = []
  for reference, r, keep in pairs:
    diffs = config_differences(reference.config, r.config, keep)
    if diffs:
      warnings.append(f'{r.workdir} differs from {reference.workdir} beyond the '
                      f'{"seed" if keep == ALWAYS_DIFFERENT else "ablated keys"}: ' +
                      '; '.join(diffs))
  digests = {}
  for r in runs:
    for d in {rec.get('eval_set') for rec in r.history}:
      digests.setdefault(d, []).append(r.workdir)
  if len(digests) > 1:
    warnings.append('the runs were evaluated on different evaluation sets: ' + '; '.join(
        f'eval_set {d}: {", ".join(dirs)}' for d, dirs in sorted(digests.items(), key=str)))
  return warnings


def arm_curves(runs: Sequence[Run], metric: str) -> dict:
  """Seed statistics of one arm's metric at the steps every seed evaluated."""
  steps = sorted(set.intersection(*[{r['step'] for r in run.history if metric in r}
                                    for run in runs]))
  if not steps:
    return {}
  values = np.array([[next(r[metric] for r in run.history if r['step'] == s) for s in steps]
                     for run in runs], np.float64)
  flops = np.array([[next(r['train_flops'] for r in run.history if r['step'] == s)
                     for s in steps] for run in runs], np.float64)
  return {'steps': steps, 'flops': flops.mean(0).tolist(), 'mean': values.mean(0).tolist(),
          'std': values.std(0).tolist(), 'min': values.min(0).tolist(),
          'max': values.max(0).tolist(), 'seeds': len(runs)}


def first_reaching(curve: dict, threshold: float) -> tuple[int, float] | None:
  """(step, FLOPs) where the seed mean first reaches threshold, or None."""
  for step, flops, mean in zip(curve['steps'], curve['flops'], curve['mean']):
    if mean >= threshold:
      return step, flops
  return None


def summarise(arms: dict[str, list[Run]], metrics: Sequence[str],
              thresholds: Sequence[float]) -> dict:
  out = {}
  for metric in metrics:
    out[metric] = {}
    for arm, runs in arms.items():
      curve = arm_curves(runs, metric)
      if not curve:
        continue
      best = int(np.argmax(curve['mean']))
      out[metric][arm] = dict(
          curve, final_mean=curve['mean'][-1], final_std=curve['std'][-1],
          best_mean=curve['mean'][best], best_step=curve['steps'][best],
          reach={str(t): first_reaching(curve, t) for t in thresholds})
  return out


def plot(metric: str, per_arm: dict, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for arm, c in sorted(per_arm.items()):
    for ax, x in zip(axes, (c['steps'], c['flops'])):
      line, = ax.plot(x, c['mean'], marker='o', markersize=3, label=f'{arm} ({c["seeds"]} seeds)')
      ax.fill_between(x, c['min'], c['max'], color=line.get_color(), alpha=0.2)
  axes[0].set_xlabel('training step')
  axes[1].set_xlabel('training FLOPs (analytic model FLOPs)')
  axes[1].set_xscale('log')
  axes[0].set_ylabel(metric)
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'{metric}: mean over seeds, min-max shaded')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _fmt_reach(reach) -> str:
  return '—' if reach is None else f'{reach[0]} ({reach[1]:.2e})'


def markdown(summary: dict, thresholds: Sequence[float], warnings: Sequence[str],
             arms: dict[str, list[Run]]) -> str:
  lines = ['# Run comparison', '']
  if warnings:
    lines += ['## Warnings', ''] + [f'- {w}' for w in warnings] + ['']
  lines += ['Runs: ' + '; '.join(f'**{a}**: ' + ', '.join(r.workdir for r in rs)
                                for a, rs in arms.items()), '']
  head = ['arm', 'seeds', 'final (mean ± std)', 'best mean (step)'] + [
      f'reaches {t} at step (FLOPs)' for t in thresholds]
  for metric, per_arm in summary.items():
    lines += [f'## {metric}', '', f'![{metric}]({_png_name(metric)})', '',
              '| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for arm, s in per_arm.items():
      row = [arm, str(s['seeds']), f'{s["final_mean"]:.3f} ± {s["final_std"]:.3f}',
             f'{s["best_mean"]:.3f} ({s["best_step"]})'] + [
                 _fmt_reach(s['reach'][str(t)]) for t in thresholds]
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  return '\n'.join(lines)


def _png_name(metric: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', metric) + '.png'


def compare(workdirs: Sequence[str], out: str, thresholds: Sequence[float] = (0.5, 0.8),
            ablated: Sequence[str] = ()) -> dict:
  """Writes the report into `out`; returns {'summary', 'warnings', 'files'}."""
  if not workdirs:
    raise ValueError('no runs to compare: pass one or more training workdirs')
  runs = [Run(w) for w in workdirs]
  arms: dict[str, list[Run]] = {}
  for r in runs:
    arms.setdefault(r.arm, []).append(r)
  metrics = sorted(set.union(*[r.metric_names() for r in runs]))
  if not metrics:
    raise ValueError('the eval histories hold no shapes/ metrics')
  warnings = consistency_warnings(runs, ablated)
  summary = summarise(arms, metrics, thresholds)
  os.makedirs(out, exist_ok=True)
  files = [plot(m, per_arm, os.path.join(out, _png_name(m)))
           for m, per_arm in summary.items() if per_arm]
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(markdown(summary, thresholds, warnings, arms))
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump({'summary': summary, 'warnings': warnings}, f, indent=2)
  files += [os.path.join(out, 'report.md'), os.path.join(out, 'summary.json')]
  return {'summary': summary, 'warnings': warnings, 'files': files}


def _floats(text: str, flag: str) -> list[float]:
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise app.UsageError(f'--{flag}={text!r}: expected comma-separated numbers') from None


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('usage: python -m tuna2_jax.compare DIR_A [DIR_B ...] --out REPORT_DIR')
  if not flags.FLAGS.out:
    raise app.UsageError('--out is required')
  result = compare(workdirs, flags.FLAGS.out, _floats(flags.FLAGS.thresholds, 'thresholds'),
                   [k for k in flags.FLAGS.ablated.split(',') if k])
  for w in result['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  print(f'wrote {os.path.join(flags.FLAGS.out, "report.md")} and '
        f'{len(result["files"]) - 2} plots')


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Report directory (PNG curves, report.md, summary.json).')
  flags.DEFINE_string('thresholds', '0.5,0.8', 'Metric values whose first crossing is reported.')
  flags.DEFINE_string('ablated', '', 'Extra config keys the runs may differ in (comma-separated).')
  cli.run(main)
