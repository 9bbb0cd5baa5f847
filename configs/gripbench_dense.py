"""GRIP-Bench dense: the tiny VLM on crowded scenes where the token budget binds.

Run it:

  python -m gripjax.main --config=configs/gripbench_dense.py --mode=eval --workdir=/tmp/dense
  python -m gripjax.main --config=configs/gripbench_dense.py --mode=pretrain_vlm --workdir=/tmp/dvlm

Every field is configs/gripbench_tiny.py's (same tiny VLM geometry: 96 x 96 images, 8 x 8 patches,
144 visual tokens), except:
  data.family     'dense' (gripjax/data/grip_bench/dense.py: 10-24 digits and 6-12 distractor
                  shapes, questions that need 1-4 named objects), prepared under its own tfds
                  config name (`dense_s0_...`), never sharing files with the standard family;
  eval.budgets    (1/2, 1/4, 1/9, 1/18, 1/36): 72, 36, 16, 8 and 4 kept tokens;
  methods         the `oracle` reference row (answer region first, gripjax/pruning/oracle.py) in
                  eval.methods and ablation.references;
  pretrain        fine-tunes the shipped tiny VLM on dense with the recipe's last stage settings
                  (launch/tiny_vlm_recipe.py 'thinned': vision tower frozen, pair grounding,
                  position auxiliaries, half the examples with thinned background);
  agent, train    the dense agent and its recipe (below);
  demo, ablation  shorter schedules of that recipe;
  vlm_checkpoint  gripjax/assets/dense_vlm, that fine-tuned VLM (test metrics in
                  gripjax/assets/dense_vlm_metrics.json, training log in
                  gripjax/assets/dense_vlm_pretrain_log.jsonl);
  pictures        eval.picture_examples = 0: the report redraws pictures from the standard family.

The shipped dense VLM is three runs of this pretrain section, 2400 steps in all (the vocabulary is
unchanged: every dense word is already in vocab.txt, so the embedding table keeps its size and
the tiny VLM's ids stay valid):

  python -m gripjax.main --config=configs/gripbench_dense.py --mode=pretrain_vlm \
      --workdir=workdir/dense_vlm                                  # 1200 steps from tiny_vlm
  python -m gripjax.main --config=configs/gripbench_dense.py --mode=pretrain_vlm \
      --workdir=workdir/dense_vlm_cont --config.pretrain.init_from=workdir/dense_vlm/vlm \
      --config.pretrain.lm_steps=600                               # warm restart: 600 more
  python -m gripjax.main --config=configs/gripbench_dense.py --mode=pretrain_vlm \
      --workdir=workdir/dense_vlm_cont2 --config.pretrain.init_from=workdir/dense_vlm_cont/vlm \
      --config.pretrain.lm_steps=600                               # and 600 more

The agent (agent.checkpoint = gripjax/assets/dense_agent, method 'grip'; its training log
gripjax/assets/dense_agent_metrics.jsonl) is the cheapest scorer (agent.width 32, agent.depth 0: no
self-attention block) trained by this config's train section:

  python -m gripjax.main --config=configs/gripbench_dense.py --mode=train_agent --workdir=workdir/dense_agent

2000 warm-up steps (ListMLE on the answer-slot attention teacher, lr 1e-3), then 300 GRPO steps
(train.second_lr 3e-4, two clipped updates per rollout batch, one batch-wide advantage scale),
keep ratios drawn from [1/36, 1/4], a validation curve at 1/9, 1/18 and 1/36 on 256 examples.
The main job (`make demo`, --mode=demo) runs a 700-step version of it (600 warm-up) on a 12,000-
example training split; the ablations (--mode=ablations) run 800 steps (600 warm-up) per variant
and seed. `--config=configs/gripbench_dense.py:smoke` is the tiny config's smoke variant on dense.
"""

import os

from gripjax import config_lib


# Budgets of the dense benchmark: 1/36 keeps 4 tokens of 144, the most patches an answer needs.
DENSE_BUDGETS = (1 / 2, 1 / 4, 1 / 9, 1 / 18, 1 / 36)


def _tiny_config(arg):
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gripbench_tiny.py'), arg)


def get_config(arg=None):
  """Returns the GRIP-Bench dense config; `arg='smoke'` is the tiny smoke variant on dense."""
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'configs/gripbench_dense.py got arg={arg!r}: expected nothing or "smoke".')
  c = _tiny_config(arg)
  with c.unlocked():
    c.data.family = 'dense'  # 'standard' (3-6 digits) or 'dense' (see gripjax/data/pipeline.py).
  c.eval.budgets = DENSE_BUDGETS
  methods = tuple(c.eval.methods)
  c.eval.methods = methods[:1] + ('oracle',) + methods[1:]  # after 'full', before the baselines
  c.eval.picture_examples = 0
  refs = tuple(c.ablation.references)
  c.ablation.references = refs[:1] + ('oracle',) + refs[1:]
  if arg == 'smoke':
    return c  # The smoke geometry trains from scratch (no checkpoint matches it).

  c.vlm_checkpoint = 'gripjax/assets/dense_vlm'
  # The agent: the cheapest scorer (no self-attention block, width 32: 2.3 MFLOPs per example, 7-12%
  # of the prefill it prunes at 4-16 kept tokens); trained by the recipe below on dense.
  c.agent.update(width=32, depth=0, checkpoint='gripjax/assets/dense_agent')
  c.train.update(steps=2300, warmup_steps=2000, lr=1e-3, second_lr=3e-4, ppo_epochs=2,
                 adv_scale='batch', rho_range=(DENSE_BUDGETS[-1], DENSE_BUDGETS[1]),
                 val_budgets=DENSE_BUDGETS[2:], val_examples=256, log_every=50, checkpoint_every=100)
  # The main job: a short version of that recipe on a smaller training split (about 9 minutes).
  c.demo.update(train_steps=700, warmup_steps=600, num_train=12000, eval_examples=500)
  c.ablation.update(train_steps=800, warmup_steps=600, variants=(
      'warmup_only', 'budget_aware', 'grpo_only', 'relaxation', 'gumbel_sigmoid', 'perturbed_topk'))
  # Fine-tuning recipe: the last stage of launch/tiny_vlm_recipe.py, from the shipped tiny VLM.
  c.pretrain.init_from = 'gripjax/assets/tiny_vlm'
  c.pretrain.update(vision_steps=0, lm_steps=1200, token_curriculum=0.0, lr=3e-4, pair_ground=True,
                    spatial_weight=1.0, background_dropout=0.5)
  return c
