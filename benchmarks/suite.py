r"""The figures of the README's speed table, measured in one process: run by gpu_suite.sh.

  python benchmarks/suite.py --parts=gemm,attention,train,sampling --out=a.json [--smoke]
  python benchmarks/suite.py --merge a.json b.json --out=suite.json   # one JSON, one table

Parts (each reuses the benchmark script of its name, so the suite measures what they do):
  gemm       bf16 matmul ceiling of the device (the best MFU any step could reach)
  attention  benchmarks/attention.py: the omni kernel against cuDNN causal at 8k and 16k, at the
             decoder's and the flow head's head shapes, after a check against dense attention
  train      benchmarks/train_step.py: Tuna-2 and Tuna-R 1.5B at 8k packed tokens (step time,
             tokens/s, model and hardware TFLOP/s, MFU from model FLOPs, peak memory)
  sampling   benchmarks/sampling.py: text->image images/s with and without the prompt cache at
             batch 1 and 16; understanding decode tokens/s
--tag names the run in the merged JSON (gpu_suite.sh runs the train part a second time with
command buffers off, tag no_command_buffer). --smoke runs every part at tiny sizes (CPU CI).
The targets are checked here and printed beside the figures, never in a timed test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import attention, sampling, train_step  # noqa: E402
from benchmarks.packed_batch import device_line  # noqa: E402
from tuna2_jax import flops  # noqa: E402

PARTS = ('gemm', 'attention', 'train', 'sampling')
CONFIG = 'experiments/tuna2_1_5b.py'
# Per part: the full (one GPU) arguments, then the smoke (CPU) ones.
SIZES = {
    'gemm': (dict(n=8192, iters=20), dict(n=256, iters=2)),
    'attention': (
        {'decoder': ['--seq_lens=8192,16384', '--heads=12,2', '--head_dim=128'],
         'flow_head': ['--seq_lens=8192,16384', '--heads=24,6', '--head_dim=64']},
        {'decoder': ['--seq_lens=64', '--heads=2,1', '--head_dim=16', '--block=32,32',
                     '--iters=1'],
         'flow_head': ['--seq_lens=64', '--heads=4,2', '--head_dim=16', '--block=32,32',
                       '--iters=1']}),
    # The remat policy of each arm: the one with the least recompute that fits one 80 GB H100
    # at one 8k row (compiled for h100-1 from a CPU host, docs/scaling.md): Tuna-2
    # dots_no_batch 61.0 GiB (save_qkv_attn 51.4, full 50.7, none 107.0: no fit); Tuna-R
    # save_qkv_attn 60.7 GiB (full 56.3; dots_no_batch 72.2, 0.6 GiB short of the 72.8 GiB a
    # 0.92 memory fraction leaves, too close).
    'train': ({'tuna2': [f'--config={CONFIG}', '--seq_len=8192', '--remat=dots_no_batch'],
               'tuna_r': [f'--config={CONFIG}:vision=encoder', '--seq_len=8192',
                          '--remat=save_qkv_attn']},
              {'tuna2': [f'--config={CONFIG}:runlocal=True', '--seq_len=128', '--steps=1',
                         '--warmup=1'],
               'tuna_r': [f'--config={CONFIG}:runlocal=True,vision=encoder', '--seq_len=128',
                          '--steps=1', '--warmup=1']}),
    'sampling': ([f'--config={CONFIG}', '--batch_sizes=1,16', '--repeats=2'],
                 [f'--config={CONFIG}:runlocal=True', '--batch_sizes=1', '--steps=2',
                  '--new_tokens=2', '--repeats=1', '--prompt_tokens=8']),
}
# Targets on one H100 (issue: the README's speed table).
MFU_TARGET = {'tuna2': 0.45, 'tuna_r': 0.40}
TOKENS_VS_REFERENCE = 4.0
ATTENTION_VS_CAUSAL = 0.70
PROMPT_CACHE_SPEEDUP = 1.15


def gemm(n: int, iters: int) -> dict:
  """Median seconds of an [n, n] x [n, n] bf16 matmul; TFLOP/s and share of the data sheet."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  seconds = attention.timed(jax.jit(jnp.dot), a, b, iters=iters)
  tflops = 2 * n ** 3 / seconds / 1e12
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  print(f'gemm bf16 {n}^3: {seconds * 1e3:.2f} ms, {tflops:.1f} TFLOP/s' +
        (f' ({tflops * 1e12 / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s peak)' if peak else ''))
  return {'n': n, 'seconds': seconds, 'tflops': tflops,
          'of_peak': None if peak is None else tflops * 1e12 / peak}


def run_parts(parts, smoke: bool, train_runs) -> dict:
  pick = lambda part: SIZES[part][1 if smoke else 0]
  out = {}
  for part in parts:
    t0 = time.perf_counter()
    print(f'--- {part}', flush=True)
    if part == 'gemm':
      out[part] = gemm(**pick(part))
    elif part == 'attention':
      out[part] = {shape: attention.main(args) for shape, args in pick(part).items()}
    elif part == 'train':
      out[part] = {name: train_step.main(pick(part)[name]) for name in train_runs}
    elif part == 'sampling':
      out[part] = sampling.main(pick(part))
    else:
      raise SystemExit(f'--parts: unknown part {part!r}; expected some of {PARTS}')
    print(f'--- {part}: {time.perf_counter() - t0:.0f} s', flush=True)
  return out


def _fmt(value, spec: str, unit: str = '') -> str:
  return 'n/a' if value is None else format(value, spec) + unit


def _verdict(value, target, compare=lambda v, t: v >= t) -> str:
  if value is None or target is None:
    return 'n/a'
  return 'yes' if compare(value, target) else 'NO'


def table(report: dict) -> list[tuple[str, str, str, str]]:
  """(figure, measured, target, met) rows of every figure the runs hold."""
  rows = []
  if 'gemm' in report:
    g = report['gemm']
    rows.append(('bf16 GEMM ceiling', f"{g['tflops']:.1f} TFLOP/s ({_fmt(g['of_peak'], '.0%')} "
                 'of peak)', '-', '-'))
  on_cpu = report.get('backend') == 'cpu'
  for name, results in report.get('attention', {}).items():
    for r in results:
      if r['pass'] == 'check':
        rows.append((f'attention {name} T={r["seq_len"]} check vs dense',
                     f"out {r['out_err']:.1e}, grads {max(r['dq'], r['dk'], r['dv']):.1e}",
                     'match', 'yes' if r['ok'] else 'NO'))
        continue
      ratio = r.get('ratio')
      target = ATTENTION_VS_CAUSAL if r['pass'] == 'fwd+bwd' and r['seq_len'] >= 16384 else None
      rows.append((f'attention {name} T={r["seq_len"]} {r["pass"]}',
                   f"{r['omni_s'] * 1e3:.2f} ms, {r['omni_tflops']:.1f} TFLOP/s, "
                   f"{_fmt(ratio, '.0%')} of causal", _fmt(target, '.0%'),
                   _verdict(ratio, target)))
  for tag in ('train', 'train_no_command_buffer'):
    for name, r in report.get(tag, {}).items():
      label = f'{name} train step' + (' (command buffers off)' if tag != 'train' else '')
      vs_ref = r['tokens_per_s'] / jax.device_count() / train_step.REFERENCE_TOKENS_PER_S
      rows.append((label, f"{r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:,.0f} tok/s, "
                   f"{r['tflops_per_device']:.1f} / {r['hw_tflops_per_device']:.1f} TFLOP/s "
                   f"model / hw, peak mem {_fmt(r['peak_memory_gib'], '.1f', ' GiB')}",
                   '-', '-'))
      rows.append((f'{label} MFU (model FLOPs)', _fmt(r['mfu'], '.1%'),
                   f'>= {MFU_TARGET[name]:.0%}', _verdict(r['mfu'], MFU_TARGET[name])))
      if name == 'tuna2':
        rows.append((f'{label} vs PyTorch reference', f'{vs_ref:.2f}x',
                     f'>= {TOKENS_VS_REFERENCE:.0f}x',
                     'n/a' if on_cpu else _verdict(vs_ref, TOKENS_VS_REFERENCE)))
  for key, r in report.get('sampling', {}).items():
    if key.startswith('t2i_'):
      rows.append((f'text->image {key[4:]}', f"{r['cached_images_per_s']:.3g} img/s cached, "
                   f"{r['full_images_per_s']:.3g} uncached", '-', '-'))
      rows.append((f'prompt cache speedup {key[4:]}', f"{r['speedup']:.2f}x",
                   f'>= {PROMPT_CACHE_SPEEDUP}x',
                   'n/a' if on_cpu else _verdict(r['speedup'], PROMPT_CACHE_SPEEDUP)))
    else:
      rows.append((f'understanding decode {key[7:]}', f'{r:,.1f} tokens/s', '-', '-'))
  return rows


def print_table(report: dict) -> None:
  rows = [('figure', 'measured', 'target', 'met')] + table(report)
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  print(f"\n{report['device']} ({report['mode']}, {report['date']})")
  for n, r in enumerate(rows):
    print('  '.join(c.ljust(w) for c, w in zip(r, widths)))
    if n == 0:
      print('  '.join('-' * w for w in widths))


def merge(paths) -> dict:
  """One report from several runs: the first run's fields, each later run's parts under its tag."""
  report = {}
  for path in paths:
    with open(path) as f:
      run = json.load(f)
    tag = run.pop('tag', None)
    if not report:
      report = run
      continue
    for part in PARTS:
      if part in run:
        report[f'{part}_{tag}' if tag else part] = run[part]
  return report


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--parts', default=','.join(PARTS))
  parser.add_argument('--smoke', action='store_true', help='tiny sizes (CPU)')
  parser.add_argument('--train', default='tuna2,tuna_r',
                      help='train-step runs, some of tuna2, tuna_r')
  parser.add_argument('--tag', default=None)
  parser.add_argument('--merge', nargs='+', help='JSON files of earlier runs to combine')
  parser.add_argument('--out', required=True, help='JSON file to write')
  args = parser.parse_args(argv)
  unknown = set(args.train.split(',')) - set(MFU_TARGET)
  if unknown:
    parser.error(f'--train: unknown run(s) {sorted(unknown)}; expected some of '
                 f'{sorted(MFU_TARGET)}')
  if args.merge:
    report = merge(args.merge)
    print_table(report)
  else:
    print(device_line())
    report = {'device': device_line(), 'backend': jax.default_backend(),
              'mode': 'smoke' if args.smoke else 'full',
              'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
              'xla_flags': os.environ.get('XLA_FLAGS', ''), 'tag': args.tag}
    report.update(run_parts(args.parts.split(','), args.smoke, args.train.split(',')))
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1)
  return report


if __name__ == '__main__':
  result = main()
  # A kernel that disagrees with dense attention fails the suite (its speed means nothing then).
  bad = [r for rows in result.get('attention', {}).values() for r in rows if r.get('ok') is False]
  sys.exit(1 if bad else 0)
