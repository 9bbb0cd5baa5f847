"""The agent's train step with text before the image (a chat template's prefix), and FLOP columns
that count the prefix.

Run: .venv/bin/python -m pytest -q tests/test_prefix_train.py

The tiny VLM of tests/test_step.py (N = 16 visual tokens, T = 6 question slots, vocabulary 20,
<bos> = 1). A P = 3 prefix `[<bos>, 5, 7]` (row 1 left-padded: `[pad, <bos>, 5]`) stands before the
image; the default prefix is <bos> alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gripjax.models import costs
from gripjax.pruning import selection_costs as sc
from gripjax.rl import phase as phase_lib
from gripjax.rl import warmup
from gripjax.train import step as step_lib
from gripjax.train import validation
from tests import helpers
from tests.test_step import FAST, N, build, fake_batch, host, tiny_config, tiny_vlm

B, BOS = 4, 1


def chat_prefix(b=B):
  """(B, 3) prefix ids and validity: [<bos>, 5, 7] on every row but row 1, which is left-padded:
  [pad, <bos>, 5]."""
  ids = np.tile(np.asarray([BOS, 5, 7], np.int32), (b, 1))
  valid = np.ones((b, 3), bool)
  ids[1], valid[1, 0] = [0, BOS, 5], False
  return ids, valid


def bos_prefix(b=B):
  """The default prefix, passed explicitly: (B, 1) <bos>, all real."""
  return np.full((b, 1), BOS, np.int32), np.ones((b, 1), bool)


# --- The attention teacher reads the visual slots where they are: P .. P + N - 1. ------------

def hand_sequence(vlm, params, visual, ids, qvalid, prefix_ids, prefix_valid):
  """`[prefix][visual][text]` built here, with keep-mode RoPE positions worked out row by row:
  prefix p -> its rank among the real prefix slots, visual j -> P' + j, text t -> P' + N + its rank
  among the real text slots (P' the real prefix slots)."""
  embed = lambda x: vlm.apply({'params': params}, jnp.asarray(x), method='embed_text')
  h = jnp.concatenate([embed(prefix_ids), visual, embed(ids)], axis=1)  # (B, P + N + T, D)
  positions = []
  for pv, tv in zip(np.asarray(prefix_valid), np.asarray(qvalid)):
    real = int(pv.sum())
    row = [int(pv[:p + 1].sum()) - 1 for p in range(len(pv))]
    row += [real + j for j in range(N)]
    row += [real + N + int(tv[:t + 1].sum()) - 1 for t in range(len(tv))]
    positions.append(row)
  key_valid = np.concatenate([prefix_valid, np.ones((len(ids), N), bool), qvalid], axis=1)
  return h, jnp.asarray(positions, jnp.int32), jnp.asarray(key_valid)


@pytest.fixture(scope='module')
def teacher_runs():
  vlm, params = tiny_vlm()
  batch = fake_batch(B, seed=3)
  ids, qvalid = jnp.asarray(batch['question_ids']), jnp.asarray(batch['question_valid'])
  chat, chat_valid = (jnp.asarray(x) for x in chat_prefix())
  bos, bos_valid = (jnp.asarray(x) for x in bos_prefix())
  p = chat.shape[1]
  depth = vlm.config.llm.depth

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(params):
    visual, _ = vlm.apply({'params': params}, jnp.asarray(batch['pixels']), method='encode_image')
    every = jnp.broadcast_to(jnp.arange(N), (B, N))  # every visual token kept
    out = {
        'chat': warmup.teacher_attention(vlm, params, visual, ids, qvalid, 'keep', prefix_ids=chat,
                                         prefix_valid=chat_valid),
        'default': warmup.teacher_attention(vlm, params, visual, ids, qvalid, 'keep'),
        'bos': warmup.teacher_attention(vlm, params, visual, ids, qvalid, 'keep', prefix_ids=bos,
                                        prefix_valid=bos_valid),
        'chat_answer': vlm.apply({'params': params}, visual, every, jnp.ones((B, N), bool), ids,
                                 qvalid, 'keep', method='answer_logits', prefix_ids=chat,
                                 prefix_valid=chat_valid),
    }
    # Brute force: each layer's attention probabilities from a fresh pass over layers 0 .. i.
    h, positions, key_valid = hand_sequence(vlm, params, visual, ids, qvalid, chat, chat_valid)
    rows = []
    for i in range(depth):
      _, attn = vlm.apply({'params': params}, h, positions, key_valid, 0, i + 1, attn_layer=i,
                          method='run_layers')  # (B, H, L, L)
      rows.append(attn[:, :, -1, :])  # the answer slot's row, (B, H, L)
    out['rows'] = jnp.stack(rows)  # (layers, B, H, L)
    return out

  return {k: host(v) for k, v in run(params).items()}, p


def brute_importance(rows, start):
  """Mean over layers and heads of the answer slot's attention on slots start .. start + N - 1,
  normalized to sum 1 per example."""
  a = rows[:, :, :, start:start + N].mean(axis=(0, 2))  # (B, N)
  return a / a.sum(-1, keepdims=True)


def test_teacher_attention_with_a_prefix_equals_brute_force(teacher_runs):
  out, p = teacher_runs
  importance, full_logits = out['chat']
  np.testing.assert_allclose(importance, brute_importance(out['rows'], p), atol=1e-6)
  np.testing.assert_allclose(np.sum(importance, -1), 1.0, rtol=1e-5)
  # Its full-token logits are the plain answer forward's with the same prefix.
  np.testing.assert_allclose(full_logits, out['chat_answer'], atol=1e-5)
  # The slots after a one-slot <bos> (1 .. N) are not the visual ones here: the check can fail.
  assert np.max(np.abs(importance - brute_importance(out['rows'], 1))) > 1e-3
  # And the prefix matters: the teacher differs from the default <bos>-only one.
  assert np.max(np.abs(importance - out['default'][0])) > 1e-3


def test_teacher_attention_with_an_explicit_bos_prefix_equals_the_default(teacher_runs):
  out, _ = teacher_runs
  for got, want in zip(out['bos'], out['default']):
    np.testing.assert_array_equal(got, want)


# --- One train step (warm-up, then GRPO) with a prefix in the batch. -------------------------

def with_prefix(batch, prefix):
  """The batch with `prefix` = (prefix_ids, prefix_valid) added; () leaves it as it is."""
  return dict(batch, **dict(zip(('prefix_ids', 'prefix_valid'), prefix)))


def run_steps(config, batch, steps=2):
  """`steps` train steps from the same initial state on `batch` without a prefix, with the P = 3
  chat prefix and with an explicit <bos> prefix: {name: (metrics of each step, final params)}."""
  _, vlm_params, _, state, train_step = build(config, optax.sgd(0.1))
  init = host(state)
  out = {}
  for name, prefix in (('plain', ()), ('chat', chat_prefix(len(batch['answer_id']))),
                       ('bos', bos_prefix(len(batch['answer_id'])))):
    state = jax.tree.map(jnp.asarray, init)  # A fresh copy: the step donates its state.
    arrays = {k: jnp.asarray(v) for k, v in with_prefix(batch, prefix).items()}
    metrics = []
    for _ in range(steps):
      state, m = train_step(state, arrays, vlm_params)
      metrics.append({k: float(v) for k, v in host(m).items()})
    out[name] = (metrics, host(state.params))
  return out


@pytest.fixture(scope='module')
def step_runs():
  return run_steps(tiny_config(warmup_steps=1), fake_batch(8, seed=1))


def test_train_step_with_a_prefix_runs_and_the_prefix_matters(step_runs):
  plain, (chat, chat_params) = step_runs['plain'][0], step_runs['chat']
  assert [float(m['phase']) for m in chat] == [0.0, 1.0]
  for m in chat:
    assert all(np.isfinite(v) for v in m.values()), m
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(chat_params))
  # Warm-up: the attention teacher (and so ListMLE on its order) sees the prefix.
  assert chat[0]['warmup/listmle'] != plain[0]['warmup/listmle']
  # GRPO: the rollouts' answers, so the rewards and the loss, see it too.
  assert chat[1]['reward/mean'] != plain[1]['reward/mean']
  assert chat[1]['loss'] != plain[1]['loss']


def test_train_step_with_an_explicit_bos_prefix_equals_the_default(step_runs):
  (plain, plain_params), (bos, bos_params) = step_runs['plain'], step_runs['bos']
  assert bos == plain
  for x, y in zip(jax.tree.leaves(bos_params), jax.tree.leaves(plain_params)):
    np.testing.assert_array_equal(x, y)


class PrefixRecordingVLM:
  """Stands in for the frozen VLM in a phase: answer logits [sum_j w_j u_j, 0] with u_j =
  visual[..., j, 0] (w the weights or validity of the visual slots), and a record of the rows of
  every answer-slot forward with the prefix it was given."""

  def __init__(self):
    self.calls = []

  def apply(self, variables, visual, index, valid, text_ids, text_valid, position_mode=None,
            visual_weight=None, method=None, prefix_ids=None, prefix_valid=None):
    del variables, index, position_mode
    assert method == 'answer_logits', method
    self.calls.append({'rows': visual.shape[0], 'text_ids': np.asarray(text_ids),
                       'prefix_ids': None if prefix_ids is None else np.asarray(prefix_ids),
                       'prefix_valid': None if prefix_valid is None else np.asarray(prefix_valid)})
    assert text_valid.shape == text_ids.shape
    w = jnp.asarray(valid, jnp.float32) if visual_weight is None else visual_weight  # (R, n)
    good = jnp.sum(w * visual[..., 0], axis=-1)  # (R,)
    return jnp.stack([good, jnp.zeros_like(good)], axis=-1)  # (R, 2)


@pytest.mark.parametrize('algorithm', ['grpo', 'relaxation', 'gumbel_sigmoid', 'perturbed_topk'])
def test_every_second_phase_tiles_the_prefix_with_the_question(algorithm):
  """Rollout / mask row b * S + s of each answer forward gets example b's prefix and question."""
  b, n, k, samples = 3, 6, 2, 3
  config = tiny_config(algorithm=algorithm, group_size=samples)
  phase = step_lib.SECOND_PHASES[algorithm](config)
  vlm = PrefixRecordingVLM()
  prefix_ids, prefix_valid = chat_prefix(b)
  prefix_ids[2] = [BOS, 9, 4]  # Rows that differ, so a wrong tiling shows.
  question = np.arange(b * 2, dtype=np.int32).reshape(b, 2) + 3  # (B, 2)
  visual = jnp.asarray(np.random.default_rng(0).normal(size=(b, n, 2)), jnp.float32)
  inputs = phase_lib.PhaseInputs(
      vlm=vlm, vlm_params={}, visual=visual, question_ids=jnp.asarray(question),
      question_valid=jnp.ones((b, 2), bool), answer_id=jnp.zeros((b,), jnp.int32),
      rho=jnp.full((b,), k / n), k=jnp.full((b,), k, jnp.int32), k_max=k, score=lambda p: p['s'],
      ref_params={'s': jnp.zeros((b, n))}, rng=jax.random.PRNGKey(0), rows=lambda x: x,
      position_mode='keep', prefix_ids=jnp.asarray(prefix_ids),
      prefix_valid=jnp.asarray(prefix_valid))
  sgd = lambda p, o, g: (jax.tree.map(lambda x, y: x - 0.1 * y, p, g), o, optax.global_norm(g))
  phase({'s': jnp.zeros((b, n))}, None, inputs, sgd)
  assert vlm.calls and all(c['rows'] == b * samples for c in vlm.calls)
  for c in vlm.calls:
    np.testing.assert_array_equal(c['prefix_ids'], np.repeat(prefix_ids, samples, axis=0))
    np.testing.assert_array_equal(c['prefix_valid'], np.repeat(prefix_valid, samples, axis=0))
    np.testing.assert_array_equal(c['text_ids'], np.repeat(question, samples, axis=0))


def test_validation_curve_reads_the_prefix():
  vlm, vlm_params = tiny_vlm()
  config = tiny_config(val_budgets=(0.25,))
  _, _, scorer, state, _ = build(config)
  plain = fake_batch(4, seed=4)
  out = {}
  for name, prefix in (('plain', ()), ('chat', chat_prefix(4))):
    validate = validation.make_validator(vlm, scorer, config, with_prefix(plain, prefix))
    out[name] = {k: float(v) for k, v in host(validate(state.params, vlm_params)).items()}
  assert np.isfinite(out['chat']['val/reward'])
  assert out['chat']['val/reward'] != out['plain']['val/reward']


# --- FLOP columns count the prefix (geometry of tests/test_selection_costs.py). --------------

V, T = helpers.COST_VOCAB, 5  # Vocabulary and question slots of the cost geometry.
lm_layer = helpers.cost_lm_layer


@pytest.fixture(scope='module')
def cost_config():
  return helpers.cost_config()


def test_pre_lm_row_counts_the_prefix_slots(cost_config):
  v, t = V, T
  scorer = costs.scorer_flops(cost_config, 16, t)
  # P = 1 (<bos>): 1 + 4 kept + 5 text = 10 slots; 3 layers of 2*10*16*48 + 2*10*16*96 + 4*10*10*16
  # = 15360 + 30720 + 6400, and the LM head 2 * 16 * 20 = 640 on the last slot.
  one = 3 * (15360 + 30720 + 6400) + 640
  assert one == 3 * lm_layer(10) + 640 == 158080
  default = sc.row_flops(cost_config, 'grip', 4, t, v)
  assert default == sc.row_flops(cost_config, 'grip', 4, t, v, 1) == {
      'lm_prefill_flops': one, 'selection_flops': scorer + 48, 'prefill_flops': one + scorer + 48}
  assert one == costs.prefill_flops(cost_config, 4, t, v)  # Unchanged for the built-in <bos>.
  # P = 5: 14 slots: 2*14*16*48 + 2*14*16*96 + 4*14*14*16 = 21504 + 43008 + 12544 = 77056 a layer.
  five = 3 * (21504 + 43008 + 12544) + 640
  assert five == 3 * lm_layer(14) + 640 == 231808
  assert sc.row_flops(cost_config, 'grip', 4, t, v, prefix_len=5) == {
      'lm_prefill_flops': five, 'selection_flops': scorer + 48, 'prefill_flops': five + scorer + 48}
  # The references too: blind runs 5 + 0 + 5 = 10 slots, the same as <bos> + 4 kept + 5 text.
  assert sc.row_flops(cost_config, 'blind', 0, t, v, prefix_len=5)['prefill_flops'] == one


def test_in_lm_row_counts_the_prefix_slots(cost_config):
  v, t = V, T
  # FastV at k = 4 (drop after layer 1), P = 5: layers 0 and 1 on 5 + 16 + 5 = 26 slots
  # (2*26*16*48 + 2*26*16*96 + 4*26*26*16 = 39936 + 79872 + 43264), layer 2 on 5 + 4 + 5 = 14.
  lm = 2 * (39936 + 79872 + 43264) + 77056 + 640
  assert lm == 2 * lm_layer(26) + lm_layer(14) + 640 == 403840
  assert sc.row_flops(cost_config, 'fastv', 4, t, v, prefix_len=5) == {
      'lm_prefill_flops': lm, 'selection_flops': 80, 'prefill_flops': lm + 80}
  # DART ranks on L = P + N + T slots: at k = 8 its key norms and final RMSNorm run on 26 slots, not
  # 22: 4 * 8 + 2 * 4 * 16 = 160 more than the P = 1 count (5871).
  assert sc.row_flops(cost_config, 'dart', 8, t, v)['selection_flops'] == 5871
  assert sc.row_flops(cost_config, 'dart', 8, t, v, prefix_len=5)['selection_flops'] == 5871 + 160
