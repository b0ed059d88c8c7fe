"""The shared skeleton of every experiment config (configs/*.py fill it in).

An experiment config is one `ml_collections.ConfigDict` with nested parts:

  config.bands   band registry entries ([] = Rubin + Euclid, jaisp_jax/bands.py)
  config.model   jaisp_jax.models.jaisp.default_model_config()
  config.data    jaisp_jax.data.pipeline.default_data_config()
  config.loss    jaisp_jax.objectives.losses.default_loss_config()
  config.optim   optimizer (below)            config.ema    EMA target (below)
  config.mesh    device mesh (below)          config.eval   held-out evaluation (below)
  plus the run-level fields below (steps, logging, checkpoints, seed).

`sized(config, size)` applies one of the size presets shared by all experiments;
configs/<exp>.py then sets what is specific to the experiment and returns the
config locked (`lock()`), so a misspelt `--config.x=` fails with the valid keys.
"""

from __future__ import annotations

import ml_collections

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import pipeline
from jaisp_jax.models import jaisp
from jaisp_jax.objectives import losses

SIZES = ('smoke', 'base', 'pod', 'torch_ref')


def base_config() -> ml_collections.ConfigDict:
  """Every field, with the seeds' defaults (the `base` size)."""
  c = ml_collections.ConfigDict()
  c.bands = []                  # band registry entries; [] = the 10 Rubin + Euclid bands
  c.model = jaisp.default_model_config()
  c.data = pipeline.default_data_config()
  c.loss = losses.default_loss_config()

  c.seed = 0                    # parameter init and step randomness (data has data.seed)
  c.total_steps = 20_000        # optimizer updates
  c.log_every = 50              # average metrics over this many steps, write + print
  c.checkpoint_every = 1000     # async orbax save interval (steps); also saved at the end
  c.keep_checkpoints = 3        # newest checkpoints kept
  c.max_consecutive_skips = 10  # stop after this many non-finite steps in a row
  c.profile_steps = 0           # >0: clu Profile traces this many steps after step 10
  c.cpu_convolutions = 'xla'    # on CPU: 'xla' (XLA's kernels, faster here) or 'ynnpack'
                                # (jaxlib's default); jaisp_jax/xla_options.py

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4             # peak AdamW learning rate (seeds: 3e-4)
  c.optim.warmup_steps = 1000   # linear warmup from 0
  c.optim.min_lr_ratio = 0.01   # cosine decays to lr * this
  c.optim.weight_decay = 0.05   # AdamW decoupled decay, not on biases/norms/position tables
  c.optim.clip_norm = 1.0       # global gradient-norm clip
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.ema = ml_collections.ConfigDict()
  c.ema.momentum = 0.996        # target momentum at step 0 (seeds: 0.996)
  c.ema.momentum_end = 1.0      # momentum at the last step (I-JEPA: 1.0)
  c.ema.schedule = 'linear'     # 'linear' (I-JEPA), 'cosine' (BYOL/DINO) or 'constant'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1              # data-parallel groups; -1 = all devices / fsdp
  c.mesh.fsdp = 1               # devices sharing one copy of the large parameters
  c.mesh.min_shard_size = 2 ** 16  # leaves with fewer elements stay replicated

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1000           # held-out evaluation interval (steps); 0 = only at the end
  c.eval.max_chips = 256        # held-out chips embedded per evaluation
  c.eval.query_band = 'rubin_r'     # retrieval: query band ...
  c.eval.gallery_band = 'euclid_vis'  # ... searched among this band's embeddings
  c.eval.collapse_rank_fraction = 0.1  # warn when RankMe < this fraction of D
  return c


def sized(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Applies a size preset in place and returns `c`."""
  if size == 'smoke':
    # A laptop CPU in a few minutes: small trunk, 16 tokens per view, simulated sky.
    # The objective differs from the seeds' in four measured ways (docs/experiments/
    # smoke_learning.md): with the seeds' (mean-pooled global, VICReg on 16 globals,
    # MLP predictor) held-out Rubin r -> Euclid VIS retrieval stays at chance.
    c.model.trunk.embed_dim = 64
    c.model.trunk.depth = 2
    c.model.trunk.num_heads = 4
    c.model.stem.kind = 'patch'
    c.model.predictor.hidden = 256
    c.model.predictor.kind = 'none'  # online tokens must match the target's directly: an MLP
    #                                  predictor absorbs the Rubin/Euclid difference
    c.model.global_pool = 'info'     # global = information-weighted token mean, not ~90% sky
    c.loss.vicreg_on = 'tokens'      # var/cov over ~500 weighted tokens, not 16 globals
    c.loss.inv = 1.0                 # VICReg invariance: a pair's two globals agree
    c.model.detr.num_queries = 16
    c.model.detr.depth = 1
    c.model.detr.num_heads = 4
    c.model.clip.embed_dim = 64
    c.model.clip.depth = 2
    c.model.clip.num_heads = 4
    c.model.clip.proj_dim = 64
    c.data.crop_arcsec = 12.8     # Rubin 64 px, Euclid 128 px: 4 x 4 tokens of 3.2"
    c.data.pairs_per_batch = 16
    c.total_steps = 600           # held-out retrieval still rises from 300 to 600 steps
    c.log_every = 50
    c.checkpoint_every = 200
    c.optim.warmup_steps = 30
    c.optim.lr = 1e-3
    c.ema.momentum = 0.98         # a short run needs a target that moves within it
    c.eval.every = 200
    c.eval.max_chips = 256
  elif size == 'base':
    c.data.crop_arcsec = 25.6     # Rubin 128 px, Euclid 256 px: 8 x 8 tokens (the seeds)
    c.data.pairs_per_batch = 32
  elif size == 'pod':
    # A TPU pod / GPU cluster: ViT-B trunk, bf16 compute, fsdp over 8 devices.
    c.model.dtype = 'bfloat16'
    c.model.trunk.embed_dim = 768
    c.model.trunk.depth = 12
    c.model.trunk.num_heads = 12
    c.model.trunk.remat = True
    c.model.predictor.hidden = 3072
    c.data.crop_arcsec = 25.6
    c.data.pairs_per_batch = 1024
    c.data.num_workers = 8
    c.mesh.fsdp = 8
    c.total_steps = 100_000
    c.optim.lr = 1.5e-3
    c.optim.warmup_steps = 5000
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval.every = 2000
  elif size == 'torch_ref':
    # The PyTorch reference benchmark's configuration (shared/bench/torch_ref):
    # B = 16 pairs of 128 x 128 px views, conv stems, D 256, depth 6, 8 heads,
    # patch 16, predictor 1024, AdamW 3e-4 / wd 0.05, EMA 0.996 constant.
    # Its views are 128 x 128 px of any band; in our sky-aligned design those are the
    # Rubin bands (a Euclid view of the same sky is 256 px, and Euclid's stride-32
    # patch embedding alone would add 16.8M parameters the reference does not have),
    # so the registry is Rubin's: 16 rubin-rubin pairs per batch, 9.59M trainable
    # parameters (reference 9.67M). docs/performance.md.
    c.bands = [b for b in bands_lib.default_registry().to_dicts() if b['instrument'] == 'rubin']
    c.data.pairing.cross_instrument = 0.0  # no second instrument
    c.data.pairing.hard = 0.5
    c.data.pairing.random = 0.5
    c.eval.gallery_band = 'rubin_i'     # retrieval within Rubin: r -> i
    c.data.simulate.size = 128          # on-the-fly sky: chips that hold a 128 px crop
    c.data.simulate.chip_px = 128
    c.model.stem.kind = 'conv'
    c.model.stem.asinh_softening = 0.0  # the reference feeds the raw image
    c.model.trunk.pos_embed = 'learned'  # the reference's learned (N, D) table
    c.loss.weight_mode = 'max'          # the reference: max(w_A, w_B) both directions
    c.data.crop_arcsec = 25.6
    c.data.pairs_per_batch = 16
    c.optim.warmup_steps = 0            # the reference: constant lr 3e-4
    c.optim.min_lr_ratio = 1.0
    c.ema.schedule = 'constant'
  else:
    raise ValueError(f'unknown size {size!r}; choose one of {", ".join(SIZES)}')
  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: assigning an unknown field raises with the valid keys."""
  c.lock()
  return c
