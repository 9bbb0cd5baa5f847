"""Trains the tiny VLM from scratch on GRIP-Bench (`--mode=pretrain_vlm`).

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=pretrain_vlm --workdir=/tmp/vlm

A tiny LLaVA-style model trained end to end from scratch learns to answer from the question alone:
its projected visual tokens collapse to a near-constant vector. Real LLaVA avoids this with a
pretrained CLIP that stays frozen while the projector learns, so the recipe does the same in two stages:

1. Vision tower alone, on direct objectives: a linear head on every patch feature (the feature layer
   the projector reads) predicts the digit and the colour under that patch, and a head on the pooled
   CLS predicts which digits are present and how many objects there are.
2. Vision tower frozen; projector and LM learn to answer (cross-entropy on the answer word and <eos>).
   A token curriculum starts the LM on every digit patch plus a small random share of the background
   patches and raises that share to all tokens over the first `pretrain.token_curriculum` of the
   stage; the rest of the stage sees every token. Without it the answer's attention is spread over
   N tokens of which a handful matter, and the LM settles on answering from the question alone
   (measured: after 250 steps, accuracy 32% with images, 30% with shuffled images, 32% with none).
   Caveat for pruning studies: the model has seen inputs with background patches removed.
   An auxiliary head (`EarlyAnswerProbe`, dropped after training) also predicts the answer from
   the last question words, which turns the image look-up into a one-hop problem at those slots.
   Grounding losses (`pretrain.ground_weight`) supervise where the LM looks, as grounded
   captioning data does for real VLMs: in layer 0, a digit or colour word of the question attends
   to the patches that show it (`pretrain.word_ground`); from layer 1 on, the slot that predicts
   the answer attends to the answer region. Each supervises only the first `pretrain.ground_heads`
   heads; the others are free. Measured from the same vision tower with a 600-step stage 2:
   validation accuracy 41% at step 350 with both losses (39% with none, 40% with the answer-slot
   loss alone) and 55% at step 600; without grounding, the earlier two-cycle recipe reached 55%
   only after 2,400 stage-2 steps.
   Caveat for pruning studies: attention-ranked pruners (FastV, PyramidDrop, the GRIP attention
   teacher) read attention that was trained to point at the answer region.
   Further stage-2 options, used by the later stages of `launch/tiny_vlm_recipe.py`, each
   continuing from the previous stage's params (`pretrain.init_from`):
   - `pretrain.pair_ground`: when a question names two digits ("is the three left of the
     eight ?"), head 0 of the answer slot grounds on the first digit and head 1 on the second,
     instead of both on the pair, whose positions one head would average together;
   - `pretrain.spatial_weight`: position auxiliaries (`SpatialProbe`) that regress each visual
     token's grid coordinates and, from the answer slot, the offset between the two named digits;
   - `pretrain.background_dropout`: a share of the examples have their background patches thinned
     at random (digit patches stay), so the LM learns to answer, and count, from the objects
     rather than from the number of tokens: pruned inputs stop being out of distribution.

Both stages log image-dependence figures on validation: accuracy with shuffled images, the spread of
answer logits across images and the variance of projected tokens across images, so a collapse shows
in the first minutes. Training state is checkpointed with Orbax and a killed run resumes. The
objectives (heads, losses, probes, image-dependence figures) are in `train/vlm_objectives.py`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm import tqdm

from gripjax import config_lib
from gripjax import runtime
from gripjax.data import pipeline
from gripjax.train import checkpoint as ckpt_lib
from gripjax.train.vlm_objectives import (EarlyAnswerProbe, SpatialProbe, VisionHeads,
                                          curriculum_keep, image_dependence, lm_loss, vision_loss,
                                          word_ground_targets)


def _schedule(lr: float, steps: int, warmup: int):
  warmup = min(warmup, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, 2), lr * 0.05)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs both stages, writes `workdir/vlm` (params) and `workdir/vlm_metrics.json`."""
  tok = runtime.tokenizer()
  vlm = runtime.make_model(config, tok)
  train_src = runtime.split_source(config, workdir, 'train')
  val_src = runtime.split_source(config, workdir, 'validation')
  num_colors = runtime.num_colors()
  pc = config.pretrain
  val_batch = next(pipeline.eval_batches(val_src, tok, min(pc.eval_examples, len(val_src)),
                                         config.data.max_question_len))
  val_batch = {k: jnp.asarray(v) for k, v in val_batch.items() if k != 'valid'}

  rng = jax.random.PRNGKey(config.seed)
  init_rng, head_rng = jax.random.split(rng)
  if pc.init_from:
    # Continue from a whole trained VLM (vision tower, projector and LM), e.g. for a further
    # stage-2 cycle with `vision_steps=0`.
    params = runtime.load_vlm_params(config, vlm, pc.init_from)
  else:
    params = runtime.init_params(vlm, init_rng)
  if pc.init_vision_from:
    # Start from a trained vision tower (for instance the shipped VLM's) instead of random weights.
    params = dict(params, vision=runtime.load_vlm_params(config, vlm, pc.init_vision_from)['vision'])
  heads = VisionHeads(11, num_colors + 1, runtime.max_objects(),
                      config.model.vit.image_size // config.model.vit.patch_size)
  n = runtime.num_visual_tokens(config)
  dv = config.model.vit.width
  head_params = jax.jit(heads.init)(head_rng, jnp.zeros((1, n, dv)), jnp.zeros((1, dv)))['params']

  total_steps = pc.vision_steps + pc.lm_steps * pc.lm_cycles
  vision_tx = optax.adamw(_schedule(pc.vision_lr, pc.vision_steps, pc.warmup_steps),
                          weight_decay=pc.weight_decay)
  # Stage 2 repeats its warm-up + cosine cycle `lm_cycles` times (warm restarts): selective
  # attention to one token among N emerges late, and a restart lets it keep improving.
  lm_schedule = optax.join_schedules(
      [_schedule(pc.lr, pc.lm_steps, pc.warmup_steps)] * pc.lm_cycles,
      [pc.lm_steps * i for i in range(1, pc.lm_cycles)])
  lm_tx = optax.adamw(lm_schedule, weight_decay=pc.weight_decay)
  vision_opt = vision_tx.init({'vit': params['vision'], 'heads': head_params})
  probe = EarlyAnswerProbe(runtime.vocab_size(config, tok))
  probe_params = jax.jit(probe.init)(jax.random.fold_in(head_rng, 1),
                                     jnp.zeros((1, 1, config.model.llm.width)))['params']
  spatial = SpatialProbe()
  spatial_params = jax.jit(spatial.init)(jax.random.fold_in(head_rng, 2),
                                         jnp.zeros((1, n, config.model.llm.width)),
                                         jnp.zeros((1, config.model.llm.width)))['params']
  probe_params = {'answer': probe_params, 'spatial': spatial_params}
  lm_trainable = {'vlm': {k: v for k, v in params.items() if k != 'vision'}, 'probe': probe_params}
  lm_opt = lm_tx.init(lm_trainable)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'heads': head_params,
           'probe': probe_params, 'vision_opt': vision_opt, 'lm_opt': lm_opt}

  manager = ckpt_lib.make_manager(os.path.join(workdir, 'pretrain_checkpoints'), max_to_keep=2)
  restored = ckpt_lib.restore_latest(manager, ckpt_lib.abstract_like(state))
  if restored is not None:
    state = restored[1]
  start = int(state['step'])

  @functools.partial(jax.jit, donate_argnums=0)
  def vision_step(state, batch):
    def loss_fn(trainable):
      p = dict(state['params'], vision=trainable['vit'])
      return vision_loss(vlm, heads, p, trainable['heads'], batch, num_colors)
    trainable = {'vit': state['params']['vision'], 'heads': state['heads']}
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt = vision_tx.update(grads, state['vision_opt'], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new = dict(state, step=state['step'] + 1, heads=trainable['heads'], vision_opt=opt,
               params=dict(state['params'], vision=trainable['vit']))
    return new, metrics

  curriculum_steps = int(pc.token_curriculum * pc.lm_steps)
  word_targets = (word_ground_targets(tok, num_colors)
                  if pc.word_ground or pc.pair_ground or pc.spatial_weight > 0 else None)

  @functools.partial(jax.jit, donate_argnums=0)
  def lm_step(state, batch):
    frozen = jax.lax.stop_gradient(state['params']['vision'])
    # Token curriculum: early on, most background patches are hidden so the few digit tokens are
    # not diluted among N in the answer's attention; the kept share of background rises linearly
    # to every token, and the remaining steps see every token.
    lm_step_index = state['step'] - pc.vision_steps
    progress = jnp.clip(lm_step_index / max(curriculum_steps, 1), 0.0, 1.0)
    keep = jnp.where(lm_step_index >= curriculum_steps, 1.0,
                     pc.curriculum_min_keep + (1.0 - pc.curriculum_min_keep) * progress)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), state['step'])
    visual_valid = curriculum_keep(rng, batch['patch_digit'], keep, pc.background_dropout)
    def loss_fn(trainable):
      return lm_loss(vlm, dict(trainable['vlm'], vision=frozen), batch, tok.eos_id,
                      config.model.position_mode, visual_valid, pc.question_loss_weight,
                      probe, trainable['probe']['answer'], pc.probe_slots, pc.probe_weight,
                      pc.ground_weight, pc.ground_heads, word_targets, pc.word_ground,
                      pc.pair_ground, spatial, trainable['probe']['spatial'], pc.spatial_weight)
    trainable = {'vlm': {k: v for k, v in state['params'].items() if k != 'vision'},
                 'probe': state['probe']}
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    metrics['background_keep'] = keep
    updates, opt = lm_tx.update(grads, state['lm_opt'], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new = dict(state, step=state['step'] + 1, lm_opt=opt, probe=trainable['probe'],
               params=dict(trainable['vlm'], vision=frozen))
    return new, metrics

  dependence = jax.jit(functools.partial(image_dependence, vlm,
                                         position_mode=config.model.position_mode))
  history = []
  batches = pipeline.prefetch(pipeline.batch_iterator(
      train_src, tok, pc.batch_size, config.data.max_question_len, shuffle=True, seed=config.seed,
      start_step=start))
  t0 = time.time()
  for step in tqdm(range(start, total_steps), initial=start, total=total_steps, desc='pretrain_vlm',
                   mininterval=5.0):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    stage = 'vision' if step < pc.vision_steps else 'lm'
    state, metrics = (vision_step if stage == 'vision' else lm_step)(state, batch)
    last = step + 1 == total_steps
    if (step + 1) % pc.log_every == 0 or last or step + 1 == pc.vision_steps:
      row = {'step': step + 1, 'stage': stage, 'seconds': round(time.time() - t0, 1)}
      row.update({k: round(float(v), 4) for k, v in metrics.items()})
      if stage == 'lm':
        row.update({k: round(float(v), 4) for k, v in
                    dependence(state['params'], val_batch).items()})
      logging.info('pretrain %s', json.dumps(row))
      history.append(row)
      with open(os.path.join(workdir, 'pretrain_log.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    if (step + 1) % (pc.log_every * 4) == 0 or step + 1 == pc.vision_steps or last:
      manager.save(step + 1, args=ckpt_lib.ocp.args.StandardSave(state))
  manager.wait_until_finished()
  out = os.path.join(workdir, 'vlm')
  ckpt_lib.save_params(out, state['params'])
  logging.info('wrote VLM params to %s (%.1f s of training this run)', out, time.time() - t0)
  return {'params_path': out, 'history': history, 'seconds': time.time() - t0}


def check(c) -> None:
  """Start-up check of `config.pretrain`; raises config_lib.ConfigError."""
  if 'pretrain' not in c:
    return
  cl = config_lib
  for f in ('batch_size', 'log_every', 'eval_examples', 'lm_cycles'):
    cl.integer(c, f'pretrain.{f}')
  for f in ('vision_steps', 'lm_steps', 'warmup_steps'):
    cl.integer(c, f'pretrain.{f}', minimum=0)
  for f in ('vision_lr', 'lr'):
    cl.number(c, f'pretrain.{f}')
  heads = cl.integer(c, 'pretrain.ground_heads', minimum=0)
  if heads > c.model.llm.num_heads:
    cl.fail('pretrain.ground_heads', heads, f'at most model.llm.num_heads={c.model.llm.num_heads}')
  for f in ('ground_weight', 'spatial_weight'):
    cl.number(c, f'pretrain.{f}', strict=False)
  for f in ('token_curriculum', 'curriculum_min_keep', 'background_dropout'):
    cl.fraction(c, f'pretrain.{f}')
