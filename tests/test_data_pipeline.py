"""The mixture pipeline: packing invariants and loss equivalence, mixture ratios, exact resume,
per-process sharding, fault counters up to metrics.jsonl."""

import collections
import json
import logging
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

import fake_data
from conftest import load_experiment, perturbed_params
from tuna2_jax import flow, objectives, train, train_state
from tuna2_jax.data import build_records, packing, pipeline, records, shapes
from tuna2_jax.data import sequence as seq
from tuna2_jax.data.tokenizer import Tokenizer
from tuna2_jax.layout import FIELDS, TASK_IDS

P = 16


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return fake_data.write_corpus(str(tmp_path_factory.mktemp('corpus')))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer.load()


def _config(**data):
  c = load_experiment('tuna2_data', 'runlocal=True')
  c.data.update(data)
  return c


def _random_sample(rng, task):
  img = lambda: rng.integers(0, 256, (P * rng.integers(1, 4), P * rng.integers(1, 4), 3),
                             dtype=np.uint8)
  text = lambda n, train=False: seq.Text(list(rng.integers(10, 100, n)), train)
  pieces = {'t2i': [text(rng.integers(2, 8)), seq.Image(img(), generate=True), text(2)],
            'mmu': [text(2), seq.Image(img()), text(rng.integers(1, 6)),
                    text(rng.integers(1, 6), True)],
            'edit': [text(3), seq.Image(img()), text(2), seq.Image(img(), generate=True),
                     text(2)],
            'text': [text(1), text(rng.integers(1, 30), True)]}[task]
  return seq.assemble(pieces, task, img_id=6, patch_size=P)


def _segments(row):
  """The samples a packed row holds, as per-token arrays cut at its segment boundaries."""
  out = []
  for s in range(1, int(row['segment_ids'].max()) + 1):
    idx = np.flatnonzero(row['segment_ids'] == s)
    assert (np.diff(idx) == 1).all(), 'a segment is not contiguous'
    out.append({k: row[k][idx] for k in FIELDS})
  return out


def test_first_fit_packing_keeps_every_sample_whole_and_counts_faults():
  rng = np.random.default_rng(0)
  seq_len = 96
  elements, samples = [], []
  for i in range(120):
    if i % 9 == 4:
      elements.append(packing.fault_marker(records.FAULT_REASONS[i % 3]))
      continue
    s = _random_sample(rng, ('t2i', 'mmu', 'edit', 'text')[i % 4])
    elements.append(s)
    samples.append(s)
  ds = packing.FirstFitPackIterDataset(grain.MapDataset.source(elements).to_iter_dataset(),
                                       seq_len=seq_len, num_bins=3, patch_size=P, pad_id=0)
  rows = list(ds)
  got, faults = [], collections.Counter()
  for row in rows:
    assert row['tokens'].shape == (seq_len,) and row['patches'].shape == (seq_len, P * P * 3)
    for key in packing.SKIPPED_KEYS:
      faults[key] += int(row[key])
    segs = _segments(row)
    assert (row['segment_ids'][sum(len(s['tokens']) for s in segs):] == 0).all()  # padding last
    for k in np.unique(row['span_ids'][row['span_ids'] > 0]):  # span ids unique in the row
      assert len(np.unique(row['segment_ids'][row['span_ids'] == k])) == 1
    for seg in segs:
      got.append(seg)
      assert list(seg['positions']) == list(range(len(seg['tokens'])))
      for k in np.unique(seg['span_ids'][seg['span_ids'] > 0]):
        idx = np.flatnonzero(seg['span_ids'] == k)
        # A whole span: contiguous, its time token, then all of its patches.
        assert (np.diff(idx) == 1).all() and seg['is_time'][idx[0]]
        assert seg['is_patch'][idx[1:]].all() and not seg['is_time'][idx[1:]].any()
  want_faults = collections.Counter(packing.SKIPPED_PREFIX + records.FAULT_REASONS[int(
      e[packing.FAULT_KEY])] for e in elements if packing.FAULT_KEY in e)
  assert {k: v for k, v in faults.items() if v} == dict(want_faults)
  # Every sample exactly once; only segment and span numbering differ.
  key = lambda s: (s['tokens'].tobytes(), s['patches'].tobytes())
  assert sorted(map(key, got)) == sorted(map(key, samples))
  by_key = {key(s): s for s in samples}
  for seg in got:
    want = by_key[key(seg)]
    for k in ('targets', 'loss_mask', 'is_time', 'is_patch', 'gen_mask', 'task', 'pos3',
              'patch_grid', 'positions'):
      np.testing.assert_array_equal(seg[k], want[k])
    np.testing.assert_array_equal(seg['span_ids'] > 0, want['span_ids'] > 0)
  used = sum(len(s['tokens']) for s in samples) / (len(rows) * seq_len)
  assert used > 0.7, used  # first fit over 3 open rows keeps padding low


def _per_token_losses(model, batch, x_BTP, t_BT, x_t_BTP, t_eps):
  hidden, x_hat = model(batch, x_t_BTP, t_BT, None)
  logits = jnp.einsum('btd,dv->btv', hidden, model.decoder.lm_head_weight().astype(hidden.dtype))
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, batch['targets'][..., None], -1)[..., 0]
  flow = jnp.mean(jnp.square(x_hat - x_BTP), -1) / jnp.maximum(1 - t_BT, t_eps) ** 2
  return nll * batch['loss_mask'], flow * (batch['gen_mask'] & batch['is_patch'])


def test_packed_per_sample_losses_equal_the_unpacked_ones():
  """One packed row vs each sample alone: text and flow losses per sample agree."""
  config = load_experiment('shapes', 'runlocal=True')
  model = perturbed_params(train_state.build_model(config))
  rng = np.random.default_rng(1)
  samples = [_random_sample(rng, t) for t in ('t2i', 'mmu', 'edit', 'text', 't2i')]
  length = sum(len(s['tokens']) for s in samples) + 3
  # Each sample's noise and t (one t per generated span) are fixed, so both layouts see the same.
  extras = []
  for s in samples:
    t = np.where(s['gen_mask'], rng.uniform(0.1, 0.9, s['span_ids'].max() + 1)[s['span_ids']], 1.)
    extras.append((t.astype(np.float32), rng.standard_normal(s['patches'].shape, np.float32)))

  def layout(group):
    row = seq.pack([samples[i] for i in group], length, patch_size=P, pad_id=0)
    t = np.ones(length, np.float32)
    e = np.zeros(row['patches'].shape, np.float32)
    offset = 0
    for i in group:
      n = len(samples[i]['tokens'])
      t[offset:offset + n], e[offset:offset + n] = extras[i]
      offset += n
    return row, t, e

  rows = [layout(range(len(samples)))] + [layout([i]) for i in range(len(samples))]
  batch = {k: jnp.asarray(np.stack([r[0][k] for r in rows])) for k in FIELDS}
  t = jnp.asarray(np.stack([r[1] for r in rows]))
  e = jnp.asarray(np.stack([r[2] for r in rows]))
  x = objectives.to_unit_range(batch['patches'])
  x_t = t[..., None] * x + (1 - t[..., None]) * e
  losses = nnx.jit(_per_token_losses, static_argnums=(5,))
  nll, flow = map(np.asarray, losses(model, batch, x, t, x_t, config.flow.t_eps))
  packed_seg = np.asarray(batch['segment_ids'][0])
  for i, s in enumerate(samples):
    n = len(s['tokens'])
    for per_token in (nll, flow):
      packed = per_token[0][packed_seg == i + 1]
      alone = per_token[1 + i][:n]
      np.testing.assert_allclose(packed, alone, rtol=2e-4, atol=1e-5)
  assert nll[0].sum() > 0 and flow[0].sum() > 0


def test_the_objective_sees_each_packed_sample_as_if_alone():
  """objectives.compute_loss itself (its per-span timesteps, noise, masks, normalisation).

  compute_loss draws one t per span id of a row and noise per token slot. A sample alone in a
  row at the offset and span ids it has in the packed row gets the same draws, so its losses
  there must equal its losses in the packed row with only its tokens counted.
  """
  config = load_experiment('shapes', 'runlocal=True')
  config.flow.mmu_noisy_prob = 1.0  # understanding images noised too (per span)
  model = perturbed_params(train_state.build_model(config))
  rng = np.random.default_rng(3)
  samples = [_random_sample(rng, t) for t in ('t2i', 'mmu', 'edit', 'text', 't2i', 'mmu')]
  lengths = [len(s['tokens']) for s in samples]
  length = sum(lengths) + 5
  packed = seq.pack(samples, length, patch_size=P, pad_id=0)
  padding = seq.empty_row(length, P, 0)
  owner = np.zeros(length, int)  # sample k's tokens: k (from the lengths, not the packer's ids)
  owner[:sum(lengths)] = np.repeat(np.arange(1, len(samples) + 1), lengths)
  key = jax.random.key(11)
  loss = nnx.jit(lambda m, b: objectives.compute_loss(m, b, key, 0, config)[1])
  as_batch = lambda row: {k: jnp.asarray(v[None]) for k, v in row.items()}

  # One t per span, independent across the spans of different samples.
  t = np.asarray(flow.sample_timesteps(key, as_batch(packed), config.flow))[0]
  spans = np.unique(packed['span_ids'][packed['span_ids'] > 0])
  noised = []
  for k in spans:
    idx = packed['span_ids'] == k
    assert len(np.unique(t[idx])) == 1  # the time token and every patch of the span
    if packed['gen_mask'][idx].all():
      assert 0 < t[idx][0] < 1
    elif packed['task'][idx][0] == TASK_IDS['mmu']:
      assert 1 - config.flow.mmu_noisy_max <= t[idx][0] < 1
    else:
      assert t[idx][0] == 1  # an editing source stays clean
    noised += [t[idx][0]] if t[idx][0] < 1 else []
  assert len(noised) >= 5 and len(set(noised)) == len(noised)  # no span shares another's draw
  assert np.all(t[packed['span_ids'] == 0] == 1)

  full = loss(model, as_batch(packed))
  text_sum = flow_sum = 0.0
  for i in range(1, len(samples) + 1):
    mine = owner == i
    counted = dict(packed, loss_mask=packed['loss_mask'] * mine,
                   gen_mask=packed['gen_mask'] & mine)
    alone = {k: np.where(mine.reshape(-1, *[1] * (v.ndim - 1)), v, padding[k])
             for k, v in packed.items()}
    got, want = loss(model, as_batch(counted)), loss(model, as_batch(alone))
    for k in ('text_loss', 'flow_loss', 'text_tokens', 'flow_tokens'):
      np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-4, atol=1e-6,
                                 err_msg=f'sample {i} ({samples[i - 1]["task"][0]}): {k}')
    text_sum += float(want['text_loss']) * float(want['text_tokens'])
    flow_sum += float(want['flow_loss']) * float(want['flow_tokens'])
  # The packed row's losses are the token-weighted means of the samples' own losses.
  assert float(full['text_tokens']) > 0 and float(full['flow_tokens']) > 0
  np.testing.assert_allclose(float(full['text_loss']) * float(full['text_tokens']), text_sum,
                             rtol=1e-4)
  np.testing.assert_allclose(float(full['flow_loss']) * float(full['flow_tokens']), flow_sum,
                             rtol=1e-4)


def test_mixture_shares_match_the_weights(tmp_path, tok):
  files = fake_data.write_corpus(str(tmp_path), bad=False)
  for task, path in files.items():  # 1000 records each (grain's shuffle is slow on tiny sets)
    lines = open(path, encoding='utf-8').read().splitlines()
    files[task] = fake_data.write_jsonl(str(tmp_path / f'{task}_1k.jsonl'),
                                        (lines * 1000)[:1000])
  c = _config(**files)
  c.data.weights.update(t2i=0.45, mmu=0.3, edit=0.05, text=0.2)
  mixed = pipeline.mixed_samples(c, tok)
  n = 10_000
  counts = collections.Counter(int(mixed[i]['task'][0]) for i in range(n))
  for task, want in c.data.weights.items():  # a stream that never shows up fails here too
    got = counts[TASK_IDS[task]] / n
    assert abs(got - want) < 0.01, (task, got, want)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_sees_exactly_the_uninterrupted_batches(corpus, tok):
  c = _config(**corpus)
  c.batch_size, c.data.pack_bins = 2, 3
  it = iter(pipeline.train_dataset(c, tok))
  states, batches = [], []
  for _ in range(6):
    states.append(json.loads(json.dumps(it.get_state())))  # as the checkpoint stores it
    batches.append(next(it))
  assert set(packing.SKIPPED_KEYS) <= set(batches[0])
  assert sum(int(b[k].sum()) for b in batches for k in packing.SKIPPED_KEYS) > 0
  tasks_seen = {int(x) for b in batches for x in np.unique(b['task'])}
  assert tasks_seen == {0, 1, 2, 3, 4}
  for cut in (1, 4):
    resumed = iter(pipeline.train_dataset(c, tok))
    resumed.set_state(states[cut])
    for want, got in zip(batches[cut:], _batches(resumed, 6 - cut)):
      _assert_same(want, got)
  fresh = next(iter(pipeline.train_dataset(c, tok)))
  _assert_same(fresh, batches[0])  # deterministic for a seed
  c.seed = 1
  other = next(iter(pipeline.train_dataset(c, tok)))
  assert not np.array_equal(other['tokens'], batches[0]['tokens'])


def test_worker_processes_resume_exactly(corpus, tok):
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, as under app.run
  c = _config(t2i=corpus['t2i'], text=corpus['text'])
  c.batch_size, c.data.worker_count = 2, 2
  it = iter(pipeline.train_dataset(c, tok))
  first = _batches(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  rest = _batches(it, 2)
  resumed = iter(pipeline.train_dataset(c, tok))
  resumed.set_state(state)
  for want, got in zip(rest, _batches(resumed, 2)):
    _assert_same(want, got)
  assert not np.array_equal(first[0]['tokens'], first[1]['tokens'])


@pytest.mark.parametrize('kind', ['jsonl', 'array_record'])
def test_two_processes_see_disjoint_records(tmp_path, tok, kind):
  docs = shapes.corpus_sentences()[:40]
  path = fake_data.write_jsonl(str(tmp_path / 'docs.jsonl'), [{'text': d} for d in docs])
  if kind == 'array_record':
    path = str(tmp_path / 'docs_ar')
    build_records.convert(str(tmp_path / 'docs.jsonl'), 'text', path, num_shards=3, workers=0,
                          log=lambda m: None)
  seen = []
  for index in range(2):
    c = _config(text=path)
    c.batch_size = 4  # 2 rows per process
    it = iter(pipeline.train_dataset(c, tok, process_index=index, process_count=2))
    texts = []
    while len(set(texts)) < 20 and len(texts) < 200:  # this process's 20 records, all seen
      b = next(it)
      for r in range(2):
        for s in range(1, int(b['segment_ids'][r].max()) + 1):
          texts.append(tok.decode(b['tokens'][r][b['segment_ids'][r] == s][1:]))
    seen.append(set(texts))
  assert len(seen[0]) == len(seen[1]) == 20
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(docs)


def test_skipped_records_are_logged_with_their_location_rate_limited(tmp_path, tok, caplog):
  """Every fault is counted; the log names the record and reason: all of the first 10 of a
  reason, then every 1000th (so a source with millions of bad records cannot flood it)."""
  lines = ([{'text': 'a red circle.'}] + ['{"text": '] * 5 +
           [{'conversations': 'not a list'}] * 2100)
  path = fake_data.write_jsonl(str(tmp_path / 'docs.jsonl'), lines)
  caplog.set_level(logging.WARNING)
  ds = pipeline.stream_dataset(_config(text=path), 'text', path, tok)
  got = [ds[i] for i in range(len(lines))]  # one epoch: every record once
  counts = collections.Counter(records.FAULT_REASONS[int(g[packing.FAULT_KEY])] for g in got
                               if packing.FAULT_KEY in g)
  assert counts == {'bad_json': 5, 'bad_field': 2100}
  logged = collections.defaultdict(list)
  for r in caplog.records:
    if r.getMessage().startswith('skipped record'):
      reason = next(x for x in records.FAULT_REASONS if f': {x}: ' in r.getMessage())
      logged[reason].append(r.getMessage())
  assert len(logged['bad_json']) == 5 and len(logged['bad_field']) == 10 + 2
  for message in logged['bad_json']:  # the file and the line: lines 2..6 are the bad JSON
    assert re.search(re.escape(path) + r':[2-6]: bad_json: not valid JSON', message), message
  assert re.search(re.escape(path) + r':\d+: bad_field: .*record 2000 of this process',
                   logged['bad_field'][-1])

  # ArrayRecord records are named by folder and index, with the line they were converted from.
  corpus = fake_data.write_corpus(str(tmp_path / 'corpus'))
  folder = str(tmp_path / 't2i_ar')
  build_records.convert(corpus['t2i'], 't2i', folder, workers=0, log=lambda m: None)
  caplog.clear()
  ds = pipeline.stream_dataset(_config(t2i=folder), 't2i', folder, tok)
  assert sum(packing.FAULT_KEY in ds[i] for i in range(9)) == 1  # the caption too long to fit
  (message,) = [r.getMessage() for r in caplog.records]
  assert re.match(re.escape(f'skipped record {folder}#') + r'\d+ \(' + re.escape(corpus['t2i']) +
                  r':\d+\): too_long', message), message


def _train_on_files(corpus, workdir, total_steps):
  c = _config(**corpus)
  c.batch_size = jax.device_count()
  c.optim.schedule = 'constant'  # the lr of a step does not depend on total_steps
  c.update(total_steps=total_steps, log_every=1, checkpoint_every=2, eval_every=100)
  train.train(c, workdir)
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow
def test_training_on_files_resumes_exactly_with_cumulative_fault_counters(corpus, tmp_path):
  """train() on the mixture config: 4 steps in one go vs 2 steps, then resumed to 4."""
  whole = _train_on_files(corpus, str(tmp_path / 'whole'), 4)
  _train_on_files(corpus, str(tmp_path / 'cut'), 2)
  resumed = _train_on_files(corpus, str(tmp_path / 'cut'), 4)
  assert [line['step'] for line in resumed] == [line['step'] for line in whole] == [1, 2, 3, 4]
  for want, got in zip(whole, resumed):
    for key in ('loss', 'text_loss', 'flow_loss', 'grad_norm') + packing.SKIPPED_KEYS:
      assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (want['step'], key)
  assert all(np.isfinite(line['loss']) for line in resumed)
  # The counters count from the start of training: still growing after the restart.
  total = [sum(line[k] for k in packing.SKIPPED_KEYS) for line in resumed]
  assert 0 < total[1] < total[3], total


def test_training_refuses_a_missing_source_before_anything_runs(tmp_path):
  c = _config(mmu=str(tmp_path / 'missing.jsonl'))
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    train.train(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
