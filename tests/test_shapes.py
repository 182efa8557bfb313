"""The shapes dataset: the checker reads back every render; every text is true of its scene."""

import collections
import itertools
import re

import numpy as np
import pytest

from tuna2_jax.data import shapes as S


def _random_scenes(n, seed, max_objects=3):
  rng = np.random.default_rng(seed)
  return [S.sample_scene(rng, max_objects) for _ in range(n)]


# --- Rendering and the checker ---------------------------------------------------------------

def test_every_single_object_round_trips():
  for colour, kind, cell in itertools.product(S.COLOURS, S.KINDS, range(len(S.CELLS))):
    scene = S.Scene((S.Obj(colour, kind, cell),))
    assert S.parse(S.render(scene, 64)) == scene


@pytest.mark.parametrize('size', [32, 48, 64, 96])
def test_random_scenes_round_trip(size):
  for i, scene in enumerate(_random_scenes(600, seed=size)):
    assert S.parse(S.render(scene, size)) == scene, (size, i, scene)


def test_crowded_scenes_round_trip():
  for scene in _random_scenes(100, seed=1, max_objects=len(S.CELLS)):
    assert S.parse(S.render(scene, 48)) == scene


def test_parse_is_robust_to_noise():
  rng = np.random.default_rng(0)
  for scene in _random_scenes(200, seed=2):
    image = S.render(scene, 64).astype(np.float32) + rng.normal(0, 8, (64, 64, 3))
    assert S.parse(np.clip(np.round(image), 0, 255).astype(np.uint8)) == scene


def test_parse_is_robust_to_blur_and_offset_colours():
  rng = np.random.default_rng(1)
  for scene in _random_scenes(100, seed=3):
    image = np.pad(S.render(scene, 64).astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode='edge')
    blurred = sum(image[i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    shifted = blurred + rng.integers(-20, 21, 3)  # a global colour cast
    assert S.parse(np.clip(np.round(shifted), 0, 255).astype(np.uint8)) == scene


def test_render_is_deterministic_uint8():
  scene = _random_scenes(1, seed=4)[0]
  image = S.render(scene, 64)
  assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
  np.testing.assert_array_equal(image, S.render(scene, 64))


def test_blank_image_is_an_empty_scene():
  assert S.parse(S.render(S.Scene(()), 64)) == S.Scene(())


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='float32'):
    S.parse(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r'\(64, 64\)'):
    S.parse(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match='20'):
    S.render(S.Scene(()), 20)
  with pytest.raises(ValueError, match='one object per cell'):
    S.Scene((S.Obj('red', 'circle', 3), S.Obj('blue', 'cross', 3)))
  with pytest.raises(ValueError, match='pink'):
    S.Obj('pink', 'circle', 0)


def test_palette_classes_do_not_overlap():
  palette = np.array([S.BACKGROUND, *S.COLOURS.values()], float)
  gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
  assert S.COLOUR_TOLERANCE < min(gaps) / 2


# --- Captions and splits ---------------------------------------------------------------------

def test_caption_round_trips():
  for scene in _random_scenes(500, seed=5, max_objects=len(S.CELLS)):
    text = S.caption(scene)
    assert text == text.lower() and text.endswith('.')
    assert S.parse_caption(text) == scene


def test_caption_format_and_rejects():
  scene = S.Scene((S.Obj('blue', 'square', 4), S.Obj('red', 'circle', 0)))
  assert S.caption(scene) == 'a red circle at the top left and a blue square at the center.'
  assert S.parse_caption('a blue square at the center and a red circle at the top left.') == scene
  for bad in ['', 'a red circle at the top left', 'a pink circle at the top.',
              'a red circle at the middle.', 'a red circle at the top and a blue cross at the top.',
              'describe the image.']:
    assert S.parse_caption(bad) is None, bad


def test_held_out_is_about_ten_percent():
  objs = [S.Obj(c, k, p) for c in S.COLOURS for k in S.KINDS for p in range(len(S.CELLS))]
  scenes = [S.Scene((o,)) for o in objs]
  scenes += [S.Scene(pair) for pair in itertools.combinations(objs, 2)
             if pair[0].cell != pair[1].cell]
  fraction = np.mean([S.is_held_out(s) for s in scenes])
  assert 0.08 < fraction < 0.12, fraction


def _assert_examples_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      if isinstance(x[key], np.ndarray):
        np.testing.assert_array_equal(x[key], y[key])
      else:
        assert x[key] == y[key], key


def _scenes_of(example):
  return [v for k, v in example.items() if k.endswith('scene')]


def test_train_samplers_never_emit_held_out_and_eval_only_held_out():
  rng = np.random.default_rng(6)
  for _ in range(300):
    for example in (S.sample_t2i(rng), S.sample_mmu(rng), S.sample_edit(rng)):
      assert not any(S.is_held_out(s) for s in _scenes_of(example))
    text = S.sample_text(rng)['text']
    assert not S.is_held_out(S.parse_caption(text))
  for _ in range(50):
    assert S.is_held_out(S.sample_t2i(rng, split='eval')['scene'])
    assert S.is_held_out(S.sample_mmu(rng, split='eval')['scene'])
    assert S.is_held_out(S.sample_edit(rng, split='eval')['target_scene'])
  with pytest.raises(ValueError, match='test'):
    S.sample_t2i(rng, split='test')


def test_eval_set_is_deterministic_and_disjoint_from_training():
  for kind in ('t2i', 'mmu', 'caption', 'edit'):
    _assert_examples_equal(S.eval_set(kind, 24, seed=0, size=48),
                           S.eval_set(kind, 24, seed=0, size=48))
  mmu = S.eval_set('mmu', 40, seed=1)
  assert collections.Counter(e['qtype'] for e in mmu) == {q: 10 for q in S.QTYPES}
  assert {e['qtype'] for e in S.eval_set('caption', 8, seed=1)} == {'caption'}
  held = {S.caption(e['scene']) for e in S.eval_set('t2i', 100, seed=2) + mmu}
  rng = np.random.default_rng(2)
  train = {S.caption(S.sample_t2i(rng)['scene']) for _ in range(2000)}
  assert held and not held & train


# --- Questions and edits ---------------------------------------------------------------------

def _the_one(scene, question, **attrs):
  hits = [o for o in scene.objects
          if all(v is None or getattr(o, k) == v for k, v in attrs.items())]
  assert len(hits) == 1, f'{question!r} is ambiguous or void for {scene}'
  return hits[0]


def _true_answer(scene, q):
  """Answers a question from the scene alone, independently of the grammar's own bookkeeping."""
  cell = lambda name: S.CELLS.index(name)
  plural = {v: k for k, v in S.PLURALS.items()}
  if m := re.fullmatch(r'what colour is the object at the (.+)\?', q):
    return _the_one(scene, q, cell=cell(m[1])).colour
  if m := re.fullmatch(r'what colour is the (\w+)\?', q):
    return _the_one(scene, q, kind=m[1]).colour
  if m := re.fullmatch(r'what shape is at the (.+)\?', q):
    return _the_one(scene, q, cell=cell(m[1])).kind
  if m := re.fullmatch(r'what shape is the (\w+) object\?', q):
    return _the_one(scene, q, colour=m[1]).kind
  if q == 'how many objects are there?':
    return S.NUMBERS[len(scene.objects)]
  if m := re.fullmatch(r'how many (\w+) objects are there\?', q):
    return S.NUMBERS[sum(o.colour == m[1] for o in scene.objects)]
  if m := re.fullmatch(r'how many (\w+) are there\?', q):
    return S.NUMBERS[sum(o.kind == plural[m[1]] for o in scene.objects)]
  if m := re.fullmatch(r'where is the (\w+) object\?', q):
    return S.CELLS[_the_one(scene, q, colour=m[1]).cell]
  if m := re.fullmatch(r'where is the (?:(\w+) )?(\w+)\?', q):
    return S.CELLS[_the_one(scene, q, colour=m[1], kind=m[2]).cell]
  if q == S.CAPTION_QUESTION:
    return S.caption(scene)
  raise AssertionError(f'question {q!r} is outside the grammar')


def test_every_question_is_answered_correctly():
  for scene in _random_scenes(400, seed=7):
    for qtype, pairs in S.questions(scene).items():
      for question, answer in pairs:
        assert _true_answer(scene, question) == answer, (scene, question)
        assert len(answer.split()) <= 2
  rng = np.random.default_rng(8)
  for _ in range(300):
    ex = S.sample_mmu(rng, 32)
    assert _true_answer(ex['scene'], ex['question']) == ex['answer']
    assert S.parse(ex['image']) == ex['scene']


def test_mmu_mixes_qtypes():
  rng = np.random.default_rng(9)
  counts = collections.Counter(S.sample_mmu(rng, 32)['qtype'] for _ in range(1000))
  assert 150 < counts['caption'] < 250, counts
  assert all(150 < counts[q] < 250 for q in S.QTYPES), counts
  dist = S.answer_distribution(200, seed=0, size=32)
  assert set(dist) <= {*S.QTYPES, 'caption'} and sum(c.total() for c in dist.values()) == 200
  assert set(dist['count']) <= set(S.NUMBERS) and set(dist['colour']) <= set(S.COLOURS)


def _resolve(scene, ref):
  m = re.fullmatch(r'the (?:(\w+) )?(\w+)(?: at the (.+))?', ref)
  assert m, ref
  return _the_one(scene, ref, colour=m[1], kind=m[2],
                  cell=S.CELLS.index(m[3]) if m[3] else None)


def _apply(scene, instruction):
  """The scene an instruction asks for, worked out independently of the sampler."""
  objs = list(scene.objects)
  if m := re.fullmatch(r'add a (\w+) (\w+) at the (.+)', instruction):
    new = S.Obj(m[1], m[2], S.CELLS.index(m[3]))
    assert new.cell not in {o.cell for o in objs}
    return 'add', S.Scene((*objs, new))
  if m := re.fullmatch(r'remove (the .+)', instruction):
    objs.remove(_resolve(scene, m[1]))
    return 'remove', S.Scene(tuple(objs))
  if m := re.fullmatch(r'move (the .+) to the (.+)', instruction):
    obj, cell = _resolve(scene, m[1]), S.CELLS.index(m[2])
    assert cell not in {o.cell for o in objs}
    objs.remove(obj)
    return 'move', S.Scene((*objs, S.Obj(obj.colour, obj.kind, cell)))
  if m := re.fullmatch(r'make (the .+) (\w+)', instruction):
    obj = _resolve(scene, m[1])
    assert m[2] != obj.colour
    objs.remove(obj)
    return 'recolour', S.Scene((*objs, S.Obj(m[2], obj.kind, obj.cell)))
  raise AssertionError(f'instruction {instruction!r} is outside the grammar')


def test_edit_targets_match_instructions():
  rng = np.random.default_rng(10)
  ops = collections.Counter()
  for _ in range(600):
    ex = S.sample_edit(rng, 32, max_objects=3)
    op, want = _apply(ex['source_scene'], ex['instruction'])
    ops[op] += 1
    assert want == ex['target_scene'] and 1 <= len(want.objects) <= 3
    assert S.parse(ex['source']) == ex['source_scene']
    assert S.parse(ex['target']) == ex['target_scene']
  assert all(ops[op] > 60 for op in ('add', 'remove', 'move', 'recolour')), ops


def test_samplers_are_deterministic_per_seed():
  def draw(seed):
    rng = np.random.default_rng(seed)
    return [S.sample_t2i(rng, 32), S.sample_mmu(rng, 32), S.sample_edit(rng, 32),
            S.sample_text(rng)]
  _assert_examples_equal(draw(3), draw(3))
  assert [x.get('prompt') for x in draw(3)] != [x.get('prompt') for x in draw(4)]


def test_corpus_is_deterministic_and_covers_sampled_words():
  corpus = S.corpus_sentences()
  assert corpus == S.corpus_sentences() and len(corpus) == len(set(corpus))
  words = {w for s in corpus for w in re.findall(r'\w+|[^\w\s]', s)}
  rng = np.random.default_rng(11)
  for _ in range(200):
    ex = S.sample_mmu(rng, 32, max_objects=len(S.CELLS))
    ed = S.sample_edit(rng, 32, max_objects=len(S.CELLS))
    for text in (ex['question'], ex['answer'], ed['instruction']):
      assert set(re.findall(r'\w+|[^\w\s]', text)) <= words, text
