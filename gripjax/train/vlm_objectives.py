"""The VLM recipe's objectives (`train/pretrain.py`): vision heads, the answer loss with its probes
and grounding losses, the token curriculum, and the image-dependence figures logged while training.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gripjax.data.grip_bench import scenes
from gripjax.models import vlm as vlm_lib


class VisionHeads(nn.Module):
  """Auxiliary heads of stage 1: per-patch digit and colour, image-level presence and count."""
  num_digit_classes: int  # Digits plus "no digit".
  num_color_classes: int  # Colours plus "no colour".
  max_count: int  # Count classes are 0..max_count.
  grid: int  # Patches per side: each patch also predicts its row and column.

  @nn.compact
  def __call__(self, features, pooled):
    patch_digit = nn.Dense(self.num_digit_classes, name='patch_digit')(features)  # (B, N, 11)
    patch_color = nn.Dense(self.num_color_classes, name='patch_color')(features)  # (B, N, C+1)
    # Where a patch is must stay readable from its feature: the LM answers "in the top left" and
    # "left of" questions from the visual tokens alone.
    patch_row = nn.Dense(self.grid, name='patch_row')(features)  # (B, N, grid)
    patch_col = nn.Dense(self.grid, name='patch_col')(features)  # (B, N, grid)
    present = nn.Dense(self.num_digit_classes - 1, name='present')(pooled)  # (B, 10)
    count = nn.Dense(self.max_count + 1, name='count')(pooled)  # (B, max_count+1)
    return patch_digit, patch_color, patch_row, patch_col, present, count


class EarlyAnswerProbe(nn.Module):
  """Auxiliary head of stage 2 (discarded afterwards): predicts the answer from the final hidden
  states of the last question words, before <sep>.

  Every GRIP-Bench question needs two hops at <sep> (find the key word, then look it up in the
  image), and neither hop gets a gradient until the other works, so answers sit at the
  question-only prior for hundreds of steps. At the key word's own slot ("... the seven ?") the
  look-up is one hop, and this head rewards it directly; <sep> then only has to copy it.
  """
  vocab_size: int

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.vocab_size, name='out')(nn.LayerNorm(name='norm')(h))  # (B, S, V)


class SpatialProbe(nn.Module):
  """Auxiliary heads of stage 2 (discarded afterwards) that make "where" a linear code in the LM.

  `coords` regresses each visual token's (row, column), scaled to [-1, 1], from the token as it
  enters the LM; `relative` regresses, from the answer slot's final hidden state, the row and column
  offsets between the two digits a question names ("is the three left of the eight ?"). A
  comparison of two positions is then a sign in the residual stream instead of a lookup table
  over pairs of grid cells.
  """

  @nn.compact
  def __call__(self, visual, answer_h):
    coords = nn.Dense(2, name='coords')(visual)  # (B, N, 2)
    relative = nn.Dense(2, name='relative')(nn.LayerNorm(name='norm')(answer_h))  # (B, 2)
    return coords, relative


def _spatial_loss(probe, probe_params, visual, answer_h, head_targets, pair, grid):
  """MSE of `SpatialProbe`'s coordinates (every token) and pair offsets (pair questions only).

  Args:
    visual: (B, N, D) visual tokens entering the LM; answer_h (B, D) the answer slot's last hidden.
    head_targets: (B, >=2, N) bool; heads 0 and 1 hold the first and second named digit's patch
      on pair questions (`_pair_targets`).
    pair: (B,) bool, questions that name two digits.
    grid: patches per side.
  """
  n = visual.shape[1]
  where = jnp.stack([jnp.arange(n) // grid, jnp.arange(n) % grid], axis=-1)  # (N, 2) row, col
  where = 2.0 * where / max(grid - 1, 1) - 1.0
  coords, relative = probe.apply({'params': probe_params}, visual, answer_h)
  l_coords = jnp.mean((coords - where) ** 2)
  t = head_targets[:, :2].astype(jnp.float32)  # (B, 2, N)
  at = jnp.einsum('bhn,nc->bhc', t, where) / jnp.maximum(t.sum(-1, keepdims=True), 1.0)  # (B, 2, 2)
  offset = at[:, 1] - at[:, 0]  # (B, 2): second minus first, (rows, cols)
  l_relative = jnp.sum(jnp.mean((relative - offset) ** 2, -1) * pair) / jnp.maximum(pair.sum(), 1)
  return l_coords + l_relative


def vision_loss(vlm, heads, params, head_params, batch, num_colors):
  out = vlm.apply({'params': params}, batch['pixels'], method='vision_features')
  pd, pc, prow, pcol, present, count = heads.apply({'params': head_params}, out['features'],
                                                  out['pooled'])
  n = pd.shape[1]
  rows = jnp.broadcast_to(jnp.arange(n) // heads.grid, pd.shape[:2])  # (B, N)
  cols = jnp.broadcast_to(jnp.arange(n) % heads.grid, pd.shape[:2])  # (B, N)
  l_where = (optax.softmax_cross_entropy_with_integer_labels(prow, rows).mean()
             + optax.softmax_cross_entropy_with_integer_labels(pcol, cols).mean())
  digit = batch['patch_digit']  # (B, N) 0..9, 10 = none
  color = jnp.where(batch['patch_color'] < 0, num_colors, batch['patch_color'])  # (B, N)
  # A scene has a handful of digits among N patches: balance object and empty patches so the
  # digits are not drowned out by the background.
  is_obj = digit < 10  # (B, N)
  def balanced(ce):
    obj = jnp.sum(ce * is_obj) / jnp.maximum(is_obj.sum(), 1)
    empty = jnp.sum(ce * ~is_obj) / jnp.maximum((~is_obj).sum(), 1)
    return obj + empty
  l_digit = balanced(optax.softmax_cross_entropy_with_integer_labels(pd, digit))
  l_color = balanced(optax.softmax_cross_entropy_with_integer_labels(pc, color))
  has = jax.nn.one_hot(digit, 11)[..., :10].max(axis=1)  # (B, 10) which digits appear
  l_present = optax.sigmoid_binary_cross_entropy(present, has).mean()
  n_obj = jnp.sum(digit < 10, axis=1)  # (B,)
  l_count = optax.softmax_cross_entropy_with_integer_labels(count, n_obj).mean()
  loss = l_digit + l_color + l_present + l_count + 0.5 * l_where
  metrics = {
      'loss': loss,
      'patch_digit_acc': jnp.sum((pd.argmax(-1) == digit) * is_obj) / jnp.maximum(is_obj.sum(), 1),
      'patch_color_acc': jnp.sum((pc.argmax(-1) == color) * is_obj) / jnp.maximum(is_obj.sum(), 1),
      'count_acc': jnp.mean(count.argmax(-1) == n_obj),
      'patch_where_acc': jnp.mean((prow.argmax(-1) == rows) & (pcol.argmax(-1) == cols)),
  }
  return loss, metrics


def image_answer_logits(vlm, params, batch, position_mode='keep', pixels=None, visual_valid=None):
  """From pixels: logits (B, V) at the answer slot with every visual token (or the given validity)."""
  pixels = batch['pixels'] if pixels is None else pixels
  visual, _ = vlm.apply({'params': params}, pixels, method='encode_image')
  b, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  valid = jnp.ones((b, n), bool) if visual_valid is None else visual_valid
  # The <sep> slot predicts the answer word.
  return vlm.apply({'params': params}, visual, index, valid, batch['question_ids'],
                   batch['question_valid'], position_mode, method='answer_logits')  # (B, V)


def curriculum_keep(rng, patch_digit, background_keep, background_dropout=0.0):
  """Visual validity (B, N) of the token curriculum: every digit patch, and each background patch
  with probability `background_keep` (1.0: every token).

  With `background_dropout` > 0, that share of the examples (drawn per example) keeps each
  background patch with a probability drawn uniformly from [0, 1) per example instead: the LM
  then sees inputs that a pruner has thinned and must answer, counting included, from the objects
  rather than from how many tokens there are.
  """
  # `rng` itself draws the patches, so background_dropout=0 gives the draws of the plain curriculum.
  r_patch, r_share, r_which = rng, jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)
  b = patch_digit.shape[0]
  thinned = jax.random.uniform(r_which, (b, 1)) < background_dropout
  keep = jnp.where(thinned, jax.random.uniform(r_share, (b, 1)), background_keep)  # (B, 1)
  background = jax.random.uniform(r_patch, patch_digit.shape) < keep
  return (patch_digit < 10) | background


def lm_loss(vlm, params, batch, eos_id, position_mode, visual_valid=None, question_weight=0.0,
             probe=None, probe_params=None, probe_slots=0, probe_weight=0.0, ground_weight=0.0,
             ground_heads=0, word_targets=None, word_ground=True, pair_ground=False,
             spatial=None, spatial_params=None, spatial_weight=0.0):
  visual, _ = vlm.apply({'params': params}, batch['pixels'], method='encode_image')
  b, n, _ = visual.shape
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  valid = jnp.ones((b, n), bool) if visual_valid is None else visual_valid
  text = jnp.concatenate([batch['question_ids'], batch['answer_id'][:, None]], axis=1)  # (B, T+1)
  text_valid = jnp.concatenate([batch['question_valid'], jnp.ones((b, 1), bool)], axis=1)
  variables = {'params': params}
  h, positions, key_valid = vlm.apply(variables, visual, index, valid, text, text_valid,
                                      position_mode, method='assemble')
  depth = _llm_depth(vlm)
  l_ground = l_word = l_spatial = jnp.zeros(())
  pair = jnp.zeros((b,), bool)
  region_targets = jnp.broadcast_to(batch['region_mask'][:, None, :], (b, max(ground_heads, 2), n))
  head_targets = region_targets
  if (pair_ground or spatial_weight > 0) and word_targets is not None:
    head_targets, pair = _pair_targets(region_targets, batch, word_targets[0])
  if ground_weight > 0 and ground_heads > 0 and depth > 1:
    # Layer by layer so every layer's attention can be read; the <sep> slot (which predicts the
    # answer) is the second to last.
    has_region = batch['region_mask'].any(axis=1)  # (B,) "no" answers and zero counts have none
    answer_targets = head_targets if pair_ground and ground_heads >= 2 else region_targets
    answer_targets = answer_targets[:, :ground_heads]  # (B, Hg, N)
    per_layer = []
    for i in range(depth):
      h, attn = vlm.apply(variables, h, positions, key_valid, i, i + 1, i, method='run_layers')
      if i == 0 and word_ground and word_targets is not None:
        l_word = _word_ground_loss(attn[:, :ground_heads], batch, word_targets, n)
      if i >= 1:
        to_visual = attn[:, :ground_heads, -2, 1:1 + n]  # (B, Hg, N)
        mass = jnp.sum(to_visual * answer_targets, axis=-1)  # (B, Hg)
        per_layer.append(-jnp.log(mass + 1e-6).mean(axis=1))  # (B,)
    l_ground = jnp.sum(jnp.stack(per_layer).mean(axis=0) * has_region) / jnp.maximum(
        has_region.sum(), 1)
  else:
    h, _ = vlm.apply(variables, h, positions, key_valid, 0, depth, method='run_layers')
  logits = vlm.apply(variables, h, method='logits')  # (B, 1+N+T+1, V)
  if spatial is not None and spatial_weight > 0:
    l_spatial = _spatial_loss(spatial, spatial_params, visual, h[:, -2], head_targets, pair,
                              math.isqrt(n))
  l_probe = jnp.zeros(())
  if probe is not None and probe_slots > 0:
    # Slots of the last `probe_slots` question words: [..., word, ?, <sep>, answer] -> before '?'.
    early = h[:, -(probe_slots + 3):-3]  # (B, S, D)
    early_logits = probe.apply({'params': probe_params}, early)  # (B, S, V)
    target = jnp.broadcast_to(batch['answer_id'][:, None], early_logits.shape[:2])
    l_probe = optax.softmax_cross_entropy_with_integer_labels(early_logits, target).mean()
  l_answer = optax.softmax_cross_entropy_with_integer_labels(logits[:, -2], batch['answer_id'])
  l_eos = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], jnp.full((b,), eos_id))
  # Next-token loss on the question itself stands in for the language pre-training a real LLaVA
  # LM has had: it teaches the text side to compose, and guessing the question's next word
  # ("what color is the ...") already rewards looking at the image.
  t = batch['question_ids'].shape[1]
  q_logits = logits[:, -(t + 1):-2]  # (B, T-1, V): question slot i predicts question token i+1
  q_mask = batch['question_valid'][:, :-1] & batch['question_valid'][:, 1:]  # (B, T-1)
  l_question = optax.softmax_cross_entropy_with_integer_labels(q_logits, batch['question_ids'][:, 1:])
  l_question = jnp.sum(l_question * q_mask) / jnp.maximum(q_mask.sum(), 1)
  loss = (jnp.mean(l_answer + 0.1 * l_eos) + question_weight * l_question + probe_weight * l_probe
          + ground_weight * (l_ground + l_word) + spatial_weight * l_spatial)
  metrics = {'loss': loss, 'question_loss': l_question, 'probe_loss': l_probe,
             'ground_loss': l_ground, 'word_ground_loss': l_word, 'spatial_loss': l_spatial,
             'answer_acc': jnp.mean(logits[:, -2].argmax(-1) == batch['answer_id']),
             'visual_norm': jnp.mean(jnp.linalg.norm(visual, axis=-1))}
  return loss, metrics


def word_ground_targets(tok, num_colors):
  """(digit (V,), color (V,)) int32: the digit / colour each token names, -1 for other tokens."""
  digit = [-1] * tok.vocab_size
  color = [-1] * tok.vocab_size
  for d, word in enumerate(scenes.DIGIT_WORDS):
    digit[tok.word_id(word)] = d
  for c, word in enumerate(scenes.COLORS[:num_colors]):
    color[tok.word_id(word)] = c
  return jnp.asarray(digit, jnp.int32), jnp.asarray(color, jnp.int32)


def _pair_targets(head_targets, batch, digit_of):
  """Answer-slot targets when the question names two digits ("is the three left of the eight ?").

  The answer depends on which of the two patches is where, and one head attending to both mixes
  their positions into one average. So head 0 attends to the first named digit's patch and head 1
  to the second's; the layer's MLP then compares the two positions. Other questions, and heads
  from the third on, keep the answer region.

  Args:
    head_targets: bool (B, Hg, N), Hg >= 2: the answer region per supervised head.
    batch: with question_ids (B, T) and patch_digit (B, N).
    digit_of: int32 (V,) the digit each token names, -1 for other tokens.
  Returns:
    (bool (B, Hg, N) targets, bool (B,) mask of the pair questions).
  """
  d = digit_of[batch['question_ids']]  # (B, T)
  named = d >= 0
  t = d.shape[1]
  first = jnp.take_along_axis(d, jnp.argmax(named, axis=1)[:, None], axis=1)[:, 0]  # (B,)
  last = t - 1 - jnp.argmax(named[:, ::-1], axis=1)
  second = jnp.take_along_axis(d, last[:, None], axis=1)[:, 0]  # (B,)
  pair = named.sum(axis=1) == 2  # (B,)
  pd = batch['patch_digit']  # (B, N)
  pair_targets = jnp.stack([pd == first[:, None], pd == second[:, None]], axis=1)  # (B, 2, N)
  heads01 = jnp.where(pair[:, None, None], pair_targets, head_targets[:, :2])
  return jnp.concatenate([heads01, head_targets[:, 2:]], axis=1), pair


def _word_ground_loss(attn, batch, word_targets, n):
  """Layer-0 grounding of question words: a digit or colour word attends to the patches it names.

  Args:
    attn: (B, G, L, L) attention probs of the supervised heads, L = 1 + N + T + 1.
    batch: with question_ids (B, T), patch_digit (B, N), patch_color (B, N).
    word_targets: `word_ground_targets(...)`.
    n: visual tokens N.
  Returns:
    Mean over (word slots that name a digit or colour present in the image) of -log(attention mass
    on its patches), averaged over the heads.
  """
  digit_of, color_of = word_targets
  ids = batch['question_ids']  # (B, T)
  t = ids.shape[1]
  d = digit_of[ids]  # (B, T)
  c = color_of[ids]  # (B, T)
  target = ((d[:, :, None] >= 0) & (batch['patch_digit'][:, None, :] == d[:, :, None])) | (
      (c[:, :, None] >= 0) & (batch['patch_color'][:, None, :] == c[:, :, None]))  # (B, T, N)
  to_visual = attn[:, :, -(t + 1):-1, 1:1 + n]  # (B, G, T, N): question slots -> visual tokens
  mass = jnp.sum(to_visual * target[:, None], axis=-1)  # (B, G, T)
  nll = -jnp.log(mass + 1e-6).mean(axis=1)  # (B, T)
  has = target.any(axis=-1)  # (B, T)
  return jnp.sum(nll * has) / jnp.maximum(has.sum(), 1)


def _llm_depth(vlm) -> int:
  return vlm_lib.ModelConfig.from_config(vlm.config).llm.depth


def image_dependence(vlm, params, batch, position_mode='keep') -> dict[str, jax.Array]:
  """Figures that reveal a VLM ignoring its image, on one validation batch.

  Returns accuracy with the right images, with images rolled across the batch (each question
  paired with another example's image), and with no visual tokens; the mean over examples of the
  std of answer logits across images for a fixed question; and the variance of projected tokens
  across images relative to their mean squared norm.
  """
  logits = image_answer_logits(vlm, params, batch, position_mode)
  shuffled = image_answer_logits(vlm, params, batch, position_mode,
                           pixels=jnp.roll(batch['pixels'], 1, axis=0))
  b = batch['pixels'].shape[0]
  n = vlm_lib.ModelConfig.from_config(vlm.config).num_visual_tokens
  blind = image_answer_logits(vlm, params, batch, position_mode, visual_valid=jnp.zeros((b, n), bool))
  visual, _ = vlm.apply({'params': params}, batch['pixels'], method='encode_image')
  text_emb = vlm.apply({'params': params}, batch['question_ids'], method='embed_text')
  answer = batch['answer_id']
  spread = jnp.std(jnp.stack([logits, shuffled]), axis=0).mean() * 2.0  # |a-b| for two images
  var_across = jnp.var(visual, axis=0).mean()
  mean_sq = jnp.mean(jnp.sum(visual ** 2, -1)) / visual.shape[-1]
  right = logits.argmax(-1) == answer  # (B,)
  per_task = {}
  if 'task_id' in batch:
    for i, task in enumerate(scenes.TASKS):
      is_task = batch['task_id'] == i
      per_task[f'acc_{task}'] = jnp.sum(right * is_task) / jnp.maximum(is_task.sum(), 1)
  return per_task | {
      'acc': jnp.mean(right),
      'acc_shuffled': jnp.mean(shuffled.argmax(-1) == answer),
      'acc_blind': jnp.mean(blind.argmax(-1) == answer),
      'logit_spread_across_images': spread,
      'visual_var_across_images': var_across / jnp.maximum(mean_sq, 1e-12),
      'visual_norm': jnp.mean(jnp.linalg.norm(visual, axis=-1)),
      'text_norm': jnp.mean(jnp.linalg.norm(text_emb, axis=-1)),
  }


