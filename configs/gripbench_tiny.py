"""The embedded default: the tiny LLaVA-style VLM on GRIP-Bench.

Run it:

  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=eval --workdir=/tmp/grip
  python -m gripjax.main --config=configs/gripbench_tiny.py --mode=pretrain_vlm --workdir=/tmp/vlm

Override any field from the command line, e.g. `--config.pretrain.lr=3e-4`,
`--config.eval.budgets='(0.5, 0.25)'`, `--config.vlm_checkpoint=None`.
"""

import ml_collections

from gripjax.train import sharding


def get_config(arg=None):
  """Returns the tiny GRIP-Bench config; `arg='smoke'` shrinks everything for fast smoke tests.

  `--config=configs/gripbench_tiny.py:smoke` selects the smoke variant from the command line.
  """
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'configs/gripbench_tiny.py got arg={arg!r}: expected nothing or "smoke".')
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seed of parameter init, data order and sampling.

  # --- Model geometry (LLaVA-1.5 structure, tiny sizes). -------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.vit = ml_collections.ConfigDict()
  c.model.vit.image_size = 96  # Input resolution in pixels (square).
  c.model.vit.patch_size = 8  # Patch side in pixels: 96 / 8 = 12 x 12 = 144 visual tokens.
  c.model.vit.width = 128  # Hidden size of the vision tower.
  c.model.vit.depth = 3  # Number of encoder layers.
  c.model.vit.num_heads = 4  # Attention heads.
  c.model.vit.mlp_dim = 256  # MLP hidden size (quick-GELU).
  c.model.vit.feature_layer = -2  # Hidden state fed to the projector (-2: penultimate, as LLaVA-1.5).
  c.model.vit.layer_norm_eps = 1e-5  # LayerNorm epsilon.
  c.model.vit.feature_select_strategy = 'default'  # 'default': drop the CLS token; 'full': keep it first.
  c.model.vit.hidden_act = 'quick_gelu'  # MLP activation (CLIP: quick_gelu).
  c.model.vit.image_mean = (0.48145466, 0.4578275, 0.40821073)  # Per-channel mean for pixels in [0, 1] (CLIP).
  c.model.vit.image_std = (0.26862954, 0.26130258, 0.27577711)  # Per-channel std (CLIP).
  c.model.projector_hidden = 128  # Hidden size of the two-layer GELU projector (LLaVA: LM width).
  c.model.projector_bias = True  # Biases on both projector layers (HF multimodal_projector_bias).
  c.model.projector_act = 'gelu'  # Projector activation (HF projector_hidden_act; 'gelu' is exact erf GELU).
  c.model.llm = ml_collections.ConfigDict()
  c.model.llm.vocab_size = 0  # 0: taken from the shipped tokenizer at start-up.
  c.model.llm.width = 128  # Hidden size of the decoder.
  c.model.llm.depth = 3  # Number of decoder layers.
  c.model.llm.num_heads = 4  # Query heads.
  c.model.llm.num_kv_heads = 2  # Key/value heads (grouped-query attention).
  c.model.llm.mlp_dim = 256  # SwiGLU hidden size.
  c.model.llm.rope_theta = 10000.0  # RoPE base.
  c.model.llm.rms_norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.llm.max_len = 256  # Longest sequence (visual + text + generated tokens).
  c.model.llm.bos_id = 1  # Token id that opens every sequence (the tokenizer's <bos>).
  c.model.llm.head_dim = 0  # Per-head size of q/k/v; 0: width // num_heads (HF head_dim may differ).
  c.model.llm.hidden_act = 'silu'  # SwiGLU gate activation (HF hidden_act).
  c.model.llm.attention_bias = False  # Biases on q/k/v/o projections (HF attention_bias).
  c.model.llm.mlp_bias = False  # Biases on gate/up/down projections (HF mlp_bias).
  c.model.llm.tie_word_embeddings = False  # True: logits from the embedding table, no lm_head.
  c.model.image_token_id = -1  # Id of the image placeholder in the tokenizer (HF image_token_index); -1: none.
  c.model.param_dtype = 'float32'  # Dtype params are stored in after loading/import ('float32', 'bfloat16', 'float16').
  c.model.position_mode = 'keep'  # 'keep': kept visual tokens keep their positions; 'renumber'.
  c.model.dtype = 'float32'  # Activation dtype ('float32', 'bfloat16' or 'float16').

  # --- GRIP-Bench. ---------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds dir; None: WORKDIR/tfds.
  c.data.seed = 0  # Generation seed: same seed, same benchmark.
  c.data.num_train = 24000  # Training examples.
  c.data.num_validation = 1000  # Validation examples.
  c.data.num_test = 2000  # Test examples.
  c.data.max_question_len = 16  # Question tokens (padded/truncated, a warning is logged on truncation).
  c.data.on_bad_question = 'warn'  # Unknown words (<unk>) or > max_question_len tokens: 'warn' (log the words) or 'error'.

  # --- Shipped VLM. --------------------------------------------------------------------------------
  # Orbax checkpoint of the VLM params; relative paths start at the repository root; None: random.
  c.vlm_checkpoint = ml_collections.FieldReference('gripjax/assets/tiny_vlm', field_type=str)  # VLM.

  # --- VLM pre-training recipe (--mode=pretrain_vlm). ----------------------------------------------
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.batch_size = 32  # Examples per step.
  c.pretrain.vision_steps = 800  # Stage 1: vision tower alone on per-patch and image-level heads.
  c.pretrain.vision_lr = 1e-3  # Stage 1 peak learning rate.
  c.pretrain.lm_steps = 2500  # Stage 2: frozen vision tower; projector + LM on answers.
  c.pretrain.lr = 5e-4  # Stage 2 peak learning rate.
  c.pretrain.lm_cycles = 1  # Stage 2 runs lm_steps this many times (warm-restarted cosine).
  c.pretrain.question_loss_weight = 0.0  # Next-token loss on question words (stands in for LM pre-training).
  c.pretrain.probe_slots = 2  # Early-answer probe: last question words (before '?') that predict the answer.
  c.pretrain.probe_weight = 1.0  # Weight of the early-answer probe loss (0 disables it).
  c.pretrain.ground_weight = 1.0  # Weight of the grounding loss: answer-slot attention on the answer region.
  c.pretrain.word_ground = True  # Also ground digit and colour words (layer 0) on their patches.
  c.pretrain.ground_heads = 2  # Heads per layer (from layer 1 on) that the grounding loss supervises.
  c.pretrain.spatial_weight = 1.0  # Weight of the position auxiliaries (token coordinates; offsets of two named digits).
  c.pretrain.pair_ground = True  # Questions naming two digits: head 0 grounds on the first, head 1 on the second.
  c.pretrain.init_from = ml_collections.FieldReference(None, field_type=str)  # Optional VLM checkpoint to continue from (all params).
  c.pretrain.init_vision_from = ml_collections.FieldReference(None, field_type=str)  # Optional VLM checkpoint whose vision tower starts stage 1 (or replaces it).
  c.pretrain.token_curriculum = 0.15  # Share of stage 2 that hides part of the background patches.
  c.pretrain.background_dropout = 0.0  # Share of stage-2 examples whose background patches are randomly thinned.
  c.pretrain.curriculum_min_keep = 0.05  # Share of background patches kept at the curriculum start.
  c.pretrain.warmup_steps = 100  # Linear warm-up steps of each stage.
  c.pretrain.weight_decay = 0.01  # AdamW weight decay.
  c.pretrain.log_every = 50  # Steps between log lines (and image-dependence checks).
  c.pretrain.eval_examples = 256  # Validation examples for the image-dependence checks while training.

  # --- Evaluation (--mode=eval). -------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128  # Examples per evaluation batch.
  c.eval.split = 'test'  # Split to evaluate: 'test' (reported once) or 'validation' (for choices).
  c.eval.num_examples = ml_collections.FieldReference(None, field_type=int)  # None: the whole split.
  c.eval.budgets = (0.5, 0.25, 1 / 9, 1 / 18)  # Keep ratios rho in (0, 1] of every pruner.
  c.eval.methods = (  # Methods to compare: references, then the pruners of gripjax.pruning.
      'full', 'blind', 'shuffled', 'random', 'uniform', 'fastervlm', 'visionzip', 'divprune',
      'vispruner', 'cdpruner', 'dart', 'fastv', 'pyramiddrop', 'sparsevlm', 'grip')
  c.eval.position_modes = ('keep', 'renumber')  # Position modes to compare.
  c.eval.picture_examples = 4  # Test examples whose kept patches the report draws (0: none).

  # --- The main job (--mode=demo, `make demo`): short agent training, then the comparison. ---------
  c.demo = ml_collections.ConfigDict()
  c.demo.train_steps = 120  # Agent steps (warm-up + GRPO) of the demo; config.train.steps is the full run.
  c.demo.warmup_steps = 40  # Of which supervised warm-up.
  c.demo.eval_examples = 500  # Test examples the demo's comparison runs on (the first ones).
  c.demo.num_train = ml_collections.FieldReference(None, field_type=int)  # Training examples the demo prepares; None: data.num_train.

  # --- Agent ablations (--mode=ablations): variants x seeds, same examples and budgets. -----------
  c.ablation = ml_collections.ConfigDict()
  c.ablation.variants = (  # Variants (gripjax/eval/ablations.py), each trained per seed.
      'budget_aware', 'warmup_only', 'grpo_only', 'relaxation', 'gumbel_sigmoid', 'perturbed_topk',
      'per_budget')
  c.ablation.seeds = (0, 1, 2)  # One training run per variant (and budget, for per_budget) per seed.
  c.ablation.train_steps = 120  # Steps of every run (warm-up + GRPO, or the relaxation's steps).
  c.ablation.warmup_steps = 40  # Of which warm-up (budget_aware, per_budget; all of warmup_only).
  c.ablation.references = (  # Reference and baseline methods, evaluated once on the same examples.
      'full', 'random', 'uniform', 'fastervlm', 'visionzip', 'divprune', 'vispruner', 'cdpruner',
      'dart', 'fastv', 'pyramiddrop', 'sparsevlm')
  c.ablation.eval_examples = 500  # First examples of ablation.split each agent is evaluated on.
  c.ablation.split = 'validation'  # Split the ablations evaluate on ('validation': choices are made there).

  # --- The GRIP agent (budget-aware token scorer, gripjax/models/scorer.py). ----------------------
  c.agent = ml_collections.ConfigDict()
  c.agent.width = 64  # Hidden size d_s of the scorer.
  c.agent.depth = 1  # Self-attention blocks among visual tokens.
  c.agent.num_heads = 4  # Attention heads (must divide agent.width).
  # Orbax checkpoint of the trained agent (method 'grip' in eval); relative to the repo root.
  c.agent.checkpoint = ml_collections.FieldReference('gripjax/assets/tiny_agent', field_type=str)  # None: no 'grip' rows.

  # --- Agent training (--mode=train_agent): supervised warm-up, then GRPO. -------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # Global examples per step (each gets its own rho); divisible by the data axis.
  c.train.group_size = 8  # G: keep-sets sampled per example in GRPO (>= 2).
  c.train.steps = 300  # Total steps (warm-up + GRPO).
  c.train.warmup_steps = 100  # First steps fit the teacher ranking (ListMLE); the rest run GRPO.
  c.train.lr = 1e-3  # AdamW learning rate (after a linear ramp of 10 steps).
  c.train.second_lr = ml_collections.FieldReference(None, field_type=float)  # Learning rate after the warm-up (GRPO or a relaxation); None: train.lr.
  c.train.weight_decay = 0.0  # AdamW weight decay.
  c.train.grad_clip = 1.0  # Global gradient-norm clip.
  c.train.rho_range = (1 / 18, 1 / 2)  # (min, max) keep ratio, sampled uniformly per example.
  c.train.reward = 'logprob'  # GRPO reward: 'logprob', 'exact_match' or 'agreement' (label-free).
  c.train.clip_eps = 0.2  # GRPO ratio clip epsilon.
  c.train.kl_coef = 0.02  # Weight of the KL penalty to the warm-up policy.
  c.train.kl_estimator = 'step'  # KL to the warm-up policy: 'step' (exact, mean per selection step) or 'k3' (per keep-set).
  c.train.ppo_epochs = 1  # GRPO updates per rollout batch (the clip acts from the second on).
  c.train.adv_scale = 'group'  # Scale of the group-centred rewards: 'group' std (GRPO), one 'batch' std, or 'none' (Dr. GRPO).
  c.train.teacher = 'attention'  # Warm-up teacher: 'attention' (answer-slot attention) or 'loo'.
  c.train.warmup_top = 16  # ListMLE fits the teacher's top-m order, m = min(this, N).
  c.train.warmup_kl_coef = 0.0  # Weight of KL(teacher softmax || scorer softmax) added to ListMLE.
  c.train.loo_chunk = 16  # 'loo' teacher: leave-one-out forwards run this many tokens at a time.
  c.train.algorithm = 'grpo'  # After the warm-up: 'grpo' (the agent), or a relaxation baseline: 'relaxation' (straight-through top-k), 'gumbel_sigmoid' (gates + budget penalty), 'perturbed_topk' (perturbed optimizers).
  c.train.relax_tau = 0.5  # 'relaxation': temperature of the relaxed top-k behind the straight-through mask.
  c.train.relax_samples = ml_collections.FieldReference(None, field_type=int)  # Every relaxation: masks per example per step; None: train.group_size (GRPO's VLM forwards per example).
  c.train.relax_gate_tau = 1.0  # 'gumbel_sigmoid': temperature of the relaxed Bernoulli gates (the backward pass).
  c.train.relax_budget_weight = 2.0  # 'gumbel_sigmoid': lambda of the keep-ratio penalty lambda (mean gate - k/N)^2 (DynamicViT's 2).
  c.train.relax_perturb_sigma = 1.0  # 'perturbed_topk': scale of the Gaussian perturbation of the logits.
  c.train.log_every = 10  # Steps between metrics lines (WORKDIR/metrics.jsonl).
  c.train.val_examples = 128  # First validation examples of the validation curve (0: none), logged every log_every steps.
  c.train.val_budgets = (1 / 9, 1 / 18)  # Keep ratios of the validation curve (greedy keep-sets).
  c.train.checkpoint_every = 50  # Steps between Orbax checkpoints (WORKDIR/checkpoints).
  c.train.checkpoint_keep = 2  # Checkpoints kept (the newest); an older one is the fallback.
  c.train.mesh = (('data', -1),)  # Device mesh: (axis, size) pairs; -1 takes the remaining devices.
  c.train.sharding = sharding.default_sharding_config()  # Param sharding: strategy per tree, rules.

  # --- Inference bundle (--mode=export; load with gripjax.load_bundle). ---------------------------
  c.export = ml_collections.ConfigDict()
  c.export.dir = ml_collections.FieldReference(None, field_type=str)  # None: WORKDIR/bundle.

  if arg == 'smoke':
    _shrink_for_smoke_tests(c)
  return c


def _shrink_for_smoke_tests(c):
  """Seconds-long runs of every mode: 6x6 patches, 2-layer towers, a few dozen examples."""
  c.model.vit.update(image_size=48, width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.projector_hidden = 32
  c.model.llm.update(width=32, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=72)
  c.data.update(num_train=48, num_validation=16, num_test=24)
  c.vlm_checkpoint = None
  c.agent.checkpoint = None  # The shipped agent has the full-size geometry.
  c.eval.methods = tuple(m for m in c.eval.methods if m != 'grip')
  c.pretrain.update(batch_size=8, vision_steps=2, lm_steps=2, lm_cycles=1, warmup_steps=1,
                    log_every=1, eval_examples=8)
  c.eval.update(batch_size=8, num_examples=24)
  c.demo.update(train_steps=4, warmup_steps=2, eval_examples=24)
  c.ablation.update(seeds=(0, 1), train_steps=4, warmup_steps=2, eval_examples=16)
  c.train.update(steps=4, warmup_steps=2, batch_size=4, group_size=2, log_every=1, checkpoint_every=2)
