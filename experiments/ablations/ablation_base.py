r"""What every ablation arm shares: data, steps, batch, seeds, schedule and evaluation.

Each arm (tuna2.py, tuna2_masking.py, tuna_r.py, tuna_r_masking.py) is this config plus the
few keys it ablates, set in its own file; tests/test_ablations.py fails if a pair of arms
differs anywhere else. The model is the CPU shapes model (config_lib.shapes_model); held-out
metrics go to DIR/eval_history.jsonl every eval.metrics_every steps.

Args (comma-separated after ':'): seed=N (model init and data order; the same N gives every
arm the same data), root=DIR (where the study's runs live; Tuna-R arms start from
ROOT/tuna_r_align/seedN, which starts from ROOT/siglip_shapes/encoder), runlocal=True, and
vision=patch|encoder, which each arm fixes (config_lib.with_arg).
Running the whole study: experiments/ablations/run.sh.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402  (experiments/shapes.py)

from tuna2_jax import config_lib  # noqa: E402

# Keys the arms may differ in; compare.py warns about runs that differ in anything else.
ABLATED_KEYS = ('ablation.arm', 'model.vision', 'init_from', 'masking.enabled')


def encoder_dir(root: str) -> str:
  return os.path.join(root, 'siglip_shapes', 'encoder')


def aligned_workdir(c: ml_collections.ConfigDict) -> str:
  """The Tuna-R alignment run a Tuna-R arm of this seed starts from."""
  return os.path.join(c.ablation.root, 'tuna_r_align', f'seed{c.seed}')


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, seed=0, root='runs/ablations', vision='patch')
  c = shapes.get_config(f'runlocal={args.runlocal},vision={args.vision}')
  c.seed = args.seed
  c.ablation = ml_collections.ConfigDict(dict(arm='', root=args.root,
                                              varies=ABLATED_KEYS))
  # The paper's masking recipe (last 40% of training, half the samples, r ~ U(0, 0.5)); the
  # arms switch only masking.enabled.
  c.masking.update(enabled=False, start_fraction=0.6, sample_prob=0.5, max_ratio=0.5)
  if not args.runlocal:
    c.total_steps = 500
    c.optim.warmup_steps = 50
    c.checkpoint_every = 100
    c.eval_every = 500
    c.eval.update(metrics_every=50, num_vqa=192, num_gen=32, num_caption=24, num_samples_png=8)
    c.sampling.steps = 8
  else:
    c.eval.metrics_every = 3
  return c
