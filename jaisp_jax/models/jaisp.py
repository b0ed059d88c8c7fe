"""JAISP model variants, their config, and the inference API.

One composite Flax module, `JAISP(config, registry)`, whose sub-modules are chosen by
`config.variant` (the `model` sub-config documented in `default_model_config`):

=============  ==========================================================================
variant        what `__call__(batch)` computes (online branch; losses live in objectives/)
=============  ==========================================================================
jepa           per-band stems -> shared ViT trunk -> tokens + predictor (seed 000);
               + shift head if config.shift.enabled; + pixel decoder if
               config.recon.enabled (hybrid JEPA + reconstruction)
two_view       per-band stems -> one trunk PER INSTRUMENT into a shared space (seed 001);
               predictor optional (config.predictor.kind, 'none' for plain alignment)
detr_jepa      stems -> shared trunk -> DETR decoder -> object slots (+ slot predictor)
clip           per-instrument multi-band encoders on batch['chips'] -> CLS -> projection
masked_band    hide one band per instrument of batch['chips'], reconstruct its pixels
               from the others through stems -> shared trunk -> pixel decoder
=============  ==========================================================================

The EMA target is the SAME module applied with the train state's EMA parameters:
``model.apply({'params': ema_params}, pairs, method=JAISP.encode)`` (stop-gradient
in the train step). `encode` returns exactly what the target side of every latent
objective needs; `predict` is the online-only predictor.

Output dicts (all float32; P = number of pairs over all combos, in `pair_layout`
order; N = h*w tokens, the same for every view of a batch; Q = object queries):

  encode(pairs) -> {'a': side, 'b': side}, side = {
      'tokens': (P, N, D), 'global': (P, D), 'token_weights': (P, N),
      'objects': {'slots': (P, Q, D), 'attn': (P, Q, N), 'objectness': (P, Q)}
                                                                 # detr_jepa only
  }
  __call__(batch) -> {
      'a', 'b': side as above plus 'pred' (P, N, D) (jepa / two_view with a predictor)
                 or objects['pred'] (P, Q, D) (detr_jepa);
      'shift_pred': (P, 2) mas                     # if config.shift.enabled
      'recon': {instrument: {'pred', 'target', 'rms', 'mask', 'weights': (B, H, W),
                             'band': (B,) hidden registry band id}}
                                                   # masked_band, or recon.enabled
      'clip': {instrument: {'tokens': (B, N, D), 'global': (B, D) CLS,
                            'embedding': (B, proj_dim)}}            # clip
  }

Efficiency: the views of all pair groups go through the stems in one call per
instrument and through the trunk in ONE call (all views share the token grid).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax import xla_options
from jaisp_jax.models import decoder as decoder_lib
from jaisp_jax.models import detr as detr_lib
from jaisp_jax.models import infomap
from jaisp_jax.models import predictor as predictor_lib
from jaisp_jax.models import shift as shift_lib
from jaisp_jax.models import stems as stems_lib
from jaisp_jax.models import vit

VARIANTS = ('jepa', 'two_view', 'detr_jepa', 'clip', 'masked_band')
GLOBAL_POOLS = ('mean', 'info')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def default_model_config() -> ml_collections.ConfigDict:
  """The `config.model` sub-config with the seeds' default sizes; every field documented."""
  c = ml_collections.ConfigDict()
  c.variant = 'jepa'           # one of VARIANTS (module docstring)
  c.token_arcsec = 3.2         # token side on the sky; stride = token_arcsec / pixel scale
  #                              (3.2" = Rubin 16 px, the seeds' patch 16; Euclid 32 px)
  c.dtype = 'float32'          # compute dtype, 'float32' or 'bfloat16'; params stay float32

  c.stem = ml_collections.ConfigDict()
  c.stem.kind = 'conv'         # 'conv': reference stem (conv3x3 2->hidden->channels, GELU,
  #                              full res) + per-instrument stride-s patch embedding;
  #                              'patch': per-band linear patch embedding (cheap)
  c.stem.hidden = 32           # channels of the first 3x3 conv ('conv')
  c.stem.channels = 64         # stem output channels C ('conv'), 64 in the seeds
  c.stem.asinh_softening = 1.0 # input stretch softening*asinh(x/softening), sky-rms units;
  #                              <= 0: no stretch (S/N for the infomap is never stretched)

  c.infomap = ml_collections.ConfigDict()
  c.infomap.snr_threshold = 3.5  # soft detection threshold, sigma (models/infomap.py)
  c.infomap.softness = 0.25      # sigmoid width, sigma

  c.trunk = ml_collections.ConfigDict()
  c.trunk.embed_dim = 256      # token width D
  c.trunk.depth = 6            # transformer blocks
  c.trunk.num_heads = 8        # attention heads (D % heads == 0)
  c.trunk.mlp_ratio = 4.0      # MLP hidden = mlp_ratio * D
  c.trunk.pos_embed = 'sincos' # 'sincos' (fixed 2-D, any grid) or 'learned' (resized table)
  c.trunk.learned_pos_grid = 8 # side of the learned table ('learned' only)
  c.trunk.cls_token = False    # prepend a CLS token; global = CLS output (global_pool 'mean')
  c.trunk.remat = False        # rematerialise each block (saves activation memory)
  c.trunk.attention = 'auto'   # 'auto' (cuDNN fused kernel on GPU in bf16/f16, else XLA),
  #                              'xla', 'cudnn' or 'cudnn_padded' (cuDNN on sequences
  #                              padded to a multiple of 64, masked; models/vit.py)
  c.trunk.gelu = 'exact'       # the trunk MLPs' GELU: 'exact' (erf, the reference) or 'tanh'
  #                              (approximation; fusable into a cuBLASLt GEMM epilogue on GPUs)

  c.global_pool = 'mean'       # the global embedding (B, D) from the trunk's tokens:
  #                              'mean': mean token (the seeds), or the CLS output if
  #                              trunk.cls_token; 'info': information-weighted mean,
  #                              sum_i (w_i + floor * cov_i) t_i / sum_i (w_i + floor * cov_i)
  #                              with w the token weights of the information map and cov the
  #                              token's unmasked fraction (sources dominate, not the ~90% sky)
  c.global_pool_floor = 1e-3   # 'info': floor weight of an observed token, so a view without
  #                              any source still averages its tokens (noise alone gives ~0.01)

  c.predictor = ml_collections.ConfigDict()
  c.predictor.kind = 'mlp'     # 'mlp' (seeds: per token D->hidden->D), 'transformer', 'none'
  c.predictor.hidden = 1024    # MLP hidden width (reference 1024 = 4D at D=256)
  c.predictor.dim = 128        # transformer predictor width
  c.predictor.depth = 2        # transformer predictor blocks
  c.predictor.num_heads = 4    # transformer predictor heads

  c.detr = ml_collections.ConfigDict()  # detr_jepa only
  c.detr.num_queries = 100     # object slots Q
  c.detr.depth = 3             # decoder layers (self-attn, cross-attn, FFN)
  c.detr.num_heads = 8
  c.detr.mlp_ratio = 4.0

  c.clip = ml_collections.ConfigDict()  # clip only: per-instrument multi-band ViTs (seed 003)
  c.clip.embed_dim = 384
  c.clip.depth = 6
  c.clip.num_heads = 6
  c.clip.mlp_ratio = 4.0
  c.clip.proj_dim = 256        # projection head output (NT-Xent space)

  c.shift = ml_collections.ConfigDict()  # jepa sub-pixel shift auxiliary (models/shift.py)
  c.shift.enabled = False      # off: the seeds' objective unchanged
  c.shift.max_mas = 250.0      # shifts uniform in [-max_mas, max_mas] mas per axis
  c.shift.hidden = 128         # shift head MLP width

  c.recon = ml_collections.ConfigDict()  # masked-band pixel decoder
  c.recon.enabled = False      # build it in 'jepa' too (hybrid); always on for masked_band
  c.recon.channels = 16        # decoder channels per pixel
  return c


def compute_dtype(name: str):
  """jnp dtype of a config dtype name."""
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f'unknown dtype {name!r}; expected one of {sorted(_DTYPES)}') from None


def pair_layout(pairs: dict) -> list[tuple[str, int]]:
  """[(combo, G)] in the order pairs are concatenated in the model's outputs."""
  return [(combo, int(pairs[combo]['a']['band'].shape[0])) for combo in sorted(pairs)]


def _pair_views(pairs: dict) -> list[tuple[str, dict]]:
  """[(instrument, view)]: the 'a' views of every combo, then the 'b' views."""
  views = []
  for side in (0, 1):
    for combo, _ in pair_layout(pairs):
      views.append((combo.split('-')[side], pairs[combo]['ab'[side]]))
  return views


def sample_hidden_bands(rng: jax.Array, chips: dict) -> dict[str, jax.Array]:
  """One hidden band per instrument and sample, uniform over the valid bands.

  Returns {instrument: (B,) int32 index along the chip's band axis}.
  """
  out = {}
  for i, inst in enumerate(sorted(chips)):
    valid = jnp.asarray(chips[inst]['band_valid'])  # (B, nb)
    logits = jnp.where(valid, 0.0, -1e9)
    key = jax.random.fold_in(rng, i)
    out[inst] = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  return out


def _split(tree, sizes: list[int]):
  """Splits every leaf of `tree` along axis 0 into consecutive pieces of `sizes`."""
  cuts = np.cumsum(sizes)[:-1].tolist()
  leaves, treedef = jax.tree.flatten(tree)
  parts = [jnp.split(leaf, cuts, axis=0) for leaf in leaves]
  return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(len(sizes))]


def _concat(trees: list):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def info_pool(tokens: jax.Array, weights: jax.Array, coverage: jax.Array,
              floor: float) -> jax.Array:
  """Information-weighted mean of tokens (B, N, D) -> (B, D) (config.global_pool 'info').

  A token's weight is its information weight plus `floor` times its unmasked fraction,
  so sources dominate, a view of pure sky falls back to the mean of its observed
  tokens, and fully masked tokens never count. The weights are data, not parameters
  (no gradient flows through them).
  """
  w = jax.lax.stop_gradient(weights + floor * coverage).astype(jnp.float32)  # (B, N)
  den = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-6)  # (B, 1)
  return jnp.einsum('bn,bnd->bd', w, tokens.astype(jnp.float32)) / den


class ChipEncoder(nn.Module):
  """Multi-band encoder of one instrument (clip): all bands as input channels.

  chips (B, nb, H, W) -> channels [stretch(image), rms] of every band -> stride-s
  linear patch embedding -> ViT with CLS -> projection head (D -> D -> proj_dim).
  """

  stride: int
  embed_dim: int = 384
  depth: int = 6
  num_heads: int = 6
  mlp_ratio: float = 4.0
  proj_dim: int = 256
  asinh_softening: float = 1.0
  pos_embed: str = 'sincos'
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, rms, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    img = stems_lib.stretch(image, self.asinh_softening) * mask  # (B, nb, H, W)
    x = jnp.concatenate([img, rms * mask], axis=1).transpose(0, 2, 3, 1)  # (B, H, W, 2nb)
    x = nn.Dense(self.embed_dim, name='patch_embed', **kw)(
        stems_lib.patchify(x.astype(self.dtype), self.stride))  # (B, h, w, D)
    enc = vit.ViT(self.depth, self.num_heads, self.mlp_ratio, self.pos_embed, cls_token=True,
                  remat=self.remat, name='vit', **kw)(x)
    h = nn.gelu(nn.Dense(self.embed_dim, kernel_init=vit.dense_init, name='proj1', **kw)(
        enc['global']), approximate=False)
    emb = nn.Dense(self.proj_dim, kernel_init=vit.dense_init, name='proj2', **kw)(h)
    return {**enc, 'embedding': emb.astype(jnp.float32)}


class JAISP(nn.Module):
  """All JAISP variants (module docstring). `config` is the `model` sub-config."""

  config: Any  # ml_collections.FrozenConfigDict (hashable); see default_model_config
  registry: bands_lib.BandRegistry

  def setup(self):
    c = self.config
    if c.variant not in VARIANTS:
      raise ValueError(f'unknown model variant {c.variant!r}; expected one of {VARIANTS}')
    if c.global_pool not in GLOBAL_POOLS:
      raise ValueError(f'unknown model.global_pool {c.global_pool!r}; expected one of '
                       f'{GLOBAL_POOLS}')
    dt = compute_dtype(c.dtype)
    kw = dict(dtype=dt, param_dtype=jnp.float32)
    insts = self.registry.instruments
    if c.variant == 'clip':
      cc = c.clip
      self.chip_encoders = {
          inst: ChipEncoder(self._stride(inst), cc.embed_dim, cc.depth, cc.num_heads,
                            cc.mlp_ratio, cc.proj_dim, c.stem.asinh_softening,
                            c.trunk.pos_embed, c.trunk.remat, **kw)
          for inst in insts}
      return
    t = c.trunk
    self.stems = stems_lib.BandStems(
        self.registry, c.token_arcsec, c.stem.kind, c.stem.hidden, c.stem.channels,
        t.embed_dim, c.stem.asinh_softening, **kw)
    make_trunk = functools.partial(vit.ViT, t.depth, t.num_heads, t.mlp_ratio, t.pos_embed,
                                   t.learned_pos_grid, t.cls_token, t.remat,
                                   attention=t.get('attention', 'auto'),
                                   gelu=t.get('gelu', 'exact'), **kw)
    if c.variant == 'two_view':
      self.trunks = {inst: make_trunk() for inst in insts}
    else:
      self.trunk = make_trunk()
    if c.variant != 'masked_band':
      self.predictor = predictor_lib.make_predictor(c.predictor, dt)
    if c.variant == 'detr_jepa':
      d = c.detr
      self.detr = detr_lib.DetrDecoder(d.num_queries, d.depth, d.num_heads, d.mlp_ratio, **kw)
    if c.shift.enabled and c.variant == 'jepa':
      self.shift_head = shift_lib.ShiftHead(c.shift.hidden, c.shift.max_mas, **kw)
    if self._recon_enabled:
      self.pixel_decoders = {inst: decoder_lib.PixelDecoder(self._stride(inst), c.recon.channels,
                                                            **kw)
                             for inst in insts}
      # Which band to draw: a learned query per registry band, added to the tokens.
      self.band_queries = nn.Embed(len(self.registry), t.embed_dim, param_dtype=jnp.float32)

  # -- helpers ---------------------------------------------------------------------
  @property
  def _recon_enabled(self) -> bool:
    return self.config.variant == 'masked_band' or (
        self.config.variant == 'jepa' and self.config.recon.enabled)

  def _stride(self, instrument: str) -> int:
    return self.registry.stride(self.registry.instrument_bands(instrument)[0].name,
                                self.config.token_arcsec)

  def _trunk(self, instrument: str, x):
    if self.config.variant == 'two_view':
      return self.trunks[instrument](x)
    return self.trunk(x)

  def _encode_views(self, views: list[tuple[str, dict]]) -> list[dict]:
    """Encodes views [(instrument, view)] -> [{'tokens', 'global', 'token_weights', ...}].

    One stem call per instrument, one trunk call per (trunk, token grid) group.
    """
    c = self.config
    n = len(views)
    stem_tokens = [None] * n
    weights = [None] * n
    coverage = [None] * n
    for inst in dict.fromkeys(v[0] for v in views):  # instruments in first-seen order
      idx = [i for i, (vi, _) in enumerate(views) if vi == inst]
      cat = lambda k: jnp.concatenate([jnp.asarray(views[i][1][k]) for i in idx], axis=0)
      image, rms, mask = cat('image'), cat('rms'), cat('mask')  # (G, H, W)
      tok = self.stems(inst, image, rms, mask, cat('band'))  # (G, h, w, D)
      _, tw = infomap.information_map(image, rms, mask, self._stride(inst),
                                      c.infomap.snr_threshold, c.infomap.softness)  # (G, N)
      cov = infomap.token_weights(mask, self._stride(inst))  # (G, N) unmasked fraction
      sizes = [views[i][1]['band'].shape[0] for i in idx]
      for i, t, w, v in zip(idx, _split(tok, sizes), _split(tw, sizes), _split(cov, sizes)):
        stem_tokens[i], weights[i], coverage[i] = t, w, v
    groups: dict[tuple, list[int]] = {}
    for i, (inst, _) in enumerate(views):
      key = (inst if c.variant == 'two_view' else '', stem_tokens[i].shape[1:3])
      groups.setdefault(key, []).append(i)
    out = [None] * n
    for (trunk_key, _), idx in groups.items():
      enc = self._trunk(trunk_key, jnp.concatenate([stem_tokens[i] for i in idx], axis=0))
      if c.variant == 'detr_jepa':
        enc['objects'] = self.detr(enc['tokens'])
      for i, e in zip(idx, _split(enc, [stem_tokens[i].shape[0] for i in idx])):
        if c.global_pool == 'info':
          e['global'] = info_pool(e['tokens'], weights[i], coverage[i], c.global_pool_floor)
        out[i] = {**e, 'token_weights': weights[i]}
    return out

  # -- public methods (use with model.apply(..., method=...)) ----------------------
  def encode(self, pairs: dict) -> dict:
    """Encoder outputs of both sides of every pair: {'a': side, 'b': side}.

    This is the target branch (apply it with the EMA params). See the module
    docstring for `side`.
    """
    views = _pair_views(pairs)
    outs = self._encode_views(views)
    k = len(views) // 2
    return {'a': _concat(outs[:k]), 'b': _concat(outs[k:])}

  def encode_view(self, view: dict, instrument: str) -> dict:
    """One batch of views of `instrument` -> {'tokens', 'global', 'token_weights', ...}."""
    return self._encode_views([(instrument, view)])[0]

  def predict(self, x):
    """The online predictor: tokens (…, N, D) or slots (…, Q, D) -> same shape."""
    return self.predictor(x)

  def reconstruct(self, chips: dict, hidden: dict) -> dict:
    """Masked-band reconstruction of batch['chips'].

    Args:
      chips: batch['chips'] (see jaisp_jax.data.batch).
      hidden: {instrument: (B,) int32} index of the band to hide per sample
        (`sample_hidden_bands`); every instrument in `chips` loses one band.
    Returns:
      {instrument: {'pred', 'target', 'rms', 'mask', 'weights': (B, H, W) float32,
                    'band': (B,) registry id of the hidden band}}; `weights` is the
      pixel information map of the target, for an information-weighted loss.
    """
    c = self.config
    insts = [i for i in self.registry.instruments if i in chips]
    tok, feats, vis, ids = {}, {}, {}, {}
    for inst in insts:
      ch = chips[inst]
      b, nb, hgt, wid = ch['image'].shape
      ids[inst] = jnp.asarray([self.registry.band_id(m.name)
                               for m in self.registry.instrument_bands(inst)], jnp.int32)
      flat = lambda k: jnp.asarray(ch[k]).reshape(b * nb, hgt, wid)
      t, f = self.stems(inst, flat('image'), flat('rms'), flat('mask'),
                        jnp.tile(ids[inst], b), return_features=True)
      tok[inst] = t.reshape(b, nb, *t.shape[1:])  # (B, nb, h, w, D)
      feats[inst] = None if f is None else f.reshape(b, nb, *f.shape[1:])  # (B, nb, H, W, C)
      keep = jnp.arange(nb)[None, :] != hidden[inst][:, None]
      vis[inst] = (jnp.asarray(ch['band_valid']) & keep).astype(tok[inst].dtype)  # (B, nb)
    # Fuse the visible bands of every instrument: the token grids are sky-aligned.
    n_vis = sum(v.sum(axis=1) for v in vis.values())  # (B,)
    fused = sum(jnp.einsum('bn,bnhwd->bhwd', vis[i], tok[i]) for i in insts)
    fused = fused / jnp.maximum(n_vis, 1.0)[:, None, None, None]  # (B, h, w, D)
    enc = self.trunk(fused)
    b, h, w, d = fused.shape
    tokens = enc['tokens'].reshape(b, h, w, d)
    out = {}
    for inst in insts:
      ch = chips[inst]
      gid = jnp.take(ids[inst], hidden[inst])  # (B,) registry id of the hidden band
      query = tokens + self.band_queries(gid)[:, None, None, :]
      skip = None
      if feats[inst] is not None:
        wv = vis[inst] / jnp.maximum(vis[inst].sum(axis=1, keepdims=True), 1.0)
        skip = jnp.einsum('bn,bnhwc->bhwc', wv, feats[inst])  # (B, H, W, C)
      pred = self.pixel_decoders[inst](query, skip)  # (B, H, W)
      pick = lambda k: jnp.take_along_axis(
          jnp.asarray(ch[k]), hidden[inst][:, None, None, None], axis=1)[:, 0]
      target, rms, mask = pick('image'), pick('rms'), pick('mask')
      out[inst] = {'pred': pred, 'target': target, 'rms': rms, 'mask': mask,
                   'weights': infomap.pixel_weights(target, rms, mask, c.infomap.snr_threshold,
                                                    c.infomap.softness),
                   'band': gid}
    return out

  def embed_chips(self, chips: dict) -> dict:
    """clip: {instrument: {'tokens', 'global' (CLS), 'embedding'}} of batch['chips']."""
    return {inst: self.chip_encoders[inst](jnp.asarray(chips[inst]['image']),
                                           jnp.asarray(chips[inst]['rms']),
                                           jnp.asarray(chips[inst]['mask']))
            for inst in self.registry.instruments if inst in chips}

  def __call__(self, batch: dict, hidden: dict | None = None) -> dict:
    """Online forward pass of the configured variant (output dict: module docstring).

    Args:
      batch: {'pairs': ..., 'chips': ...} (jaisp_jax.data.batch); the parts the
        variant needs must be present (clip/masked_band: chips; others: pairs;
        hybrid: both). With config.shift.enabled the pairs must already be shifted
        (shift.shift_pairs), the same pairs the target branch sees.
      hidden: masked-band hidden bands; drawn from the 'mask' RNG stream (falls
        back to 'params') when None.
    """
    c = self.config
    out = {}
    if c.variant == 'clip':
      out['clip'] = self.embed_chips(batch['chips'])
      return out
    if c.variant != 'masked_band':
      enc = self.encode(batch['pairs'])
      if self.predictor is not None:
        for side in ('a', 'b'):
          if c.variant == 'detr_jepa':
            enc[side]['objects']['pred'] = self.predictor(enc[side]['objects']['slots'])
          else:
            enc[side]['pred'] = self.predictor(enc[side]['tokens'])
      out.update(enc)
      if c.shift.enabled and c.variant == 'jepa':
        out['shift_pred'] = self.shift_head(enc['a']['tokens'], enc['b']['tokens'])
    if self._recon_enabled and 'chips' in batch:
      if hidden is None:
        hidden = sample_hidden_bands(self.make_rng('mask'), batch['chips'])
      out['recon'] = self.reconstruct(batch['chips'], hidden)
    return out


# -- inference API -----------------------------------------------------------------

def normalise_view(image, rms):
  """Raw (B, H, W) image/rms -> the batch contract's noise units and mask.

  Pixels with non-finite values or rms <= 0 are masked (zeros); image and rms are
  divided by each sample's median valid rms (as the input pipeline does), so sky
  noise is ~1 and image / rms is the S/N. Returns (image, rms, mask) float32.
  """
  image = jnp.asarray(image, jnp.float32)
  rms = jnp.asarray(rms, jnp.float32)
  valid = jnp.isfinite(image) & jnp.isfinite(rms) & (rms > 0)
  med = jnp.nanmedian(jnp.where(valid, rms, jnp.nan), axis=(1, 2))  # (B,)
  med = jnp.where(jnp.isfinite(med) & (med > 0), med, 1.0)[:, None, None]
  image = jnp.where(valid, image, 0.0) / med
  rms = jnp.where(valid, rms, 0.0) / med
  return image, rms, valid.astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _representation_fn(model_config, registry: bands_lib.BandRegistry, instrument: str,
                       normalise: bool):
  model = JAISP(model_config, registry)
  c = model_config

  def fn(variables, image, rms, band):  # image, rms (B, H, W); band (B,)
    if normalise:
      image, rms, mask = normalise_view(image, rms)
    else:
      mask = (rms > 0).astype(jnp.float32)
    stride = registry.stride(registry.instrument_bands(instrument)[0].name, c.token_arcsec)
    pw, tw = infomap.information_map(image, rms, mask, stride, c.infomap.snr_threshold,
                                     c.infomap.softness)
    if c.variant == 'clip':
      # Single band into its slot of the instrument's multi-band input; others empty.
      nb = registry.n_bands(instrument)
      local = jnp.asarray([registry[n].index for n in registry.names], jnp.int32)[band]
      onehot = jax.nn.one_hot(local, nb, dtype=jnp.float32)[:, :, None, None]  # (B, nb, 1, 1)
      chips = {instrument: {'image': onehot * image[:, None], 'rms': onehot * rms[:, None],
                            'mask': onehot * mask[:, None]}}
      out = model.apply(variables, chips, method=JAISP.embed_chips)[instrument]
    else:
      out = model.apply(variables, {'image': image, 'rms': rms, 'mask': mask, 'band': band},
                        instrument, method=JAISP.encode_view)
    res = {'tokens': out['tokens'], 'global': out['global'], 'weights': pw[:, None],
           'token_weights': tw}
    if 'objects' in out:
      res['objects'] = out['objects']
    if 'embedding' in out:
      res['embedding'] = out['embedding']
    return res

  return xla_options.jit(fn)


def get_representation(variables, image, rms, band, model_config, registry=None, *,
                       normalise: bool = True) -> dict:
  """Representation of single-band images (the seeds' inference API).

  Args:
    variables: {'params': ...} of a JAISP model (online or EMA params).
    image, rms: (B, 1, H, W) arrays of one band; H, W multiples of the band's stride.
    band: band name (e.g. 'rubin_r') or registry id.
    model_config: the `model` sub-config the parameters were trained with.
    registry: band registry (default: Rubin + Euclid).
    normalise: divide by the median valid rms and mask bad pixels (set False if the
      inputs are already in the batch contract's noise units with zeros masked).
  Returns:
    {'tokens': (B, N, D), 'global': (B, D), 'weights': (B, 1, H, W) pixel information
    map, 'token_weights': (B, N)}; detr_jepa adds 'objects' {'slots' (B, Q, D),
    'attn' (B, Q, N), 'objectness' (B, Q)}; clip adds 'embedding' (B, proj_dim)
    (the band fills its slot of the multi-band input, the other bands are empty).
  """
  registry = registry or bands_lib.default_registry()
  name = registry.names[int(band)] if not isinstance(band, str) else band
  instrument = registry[name].instrument
  image, rms = jnp.asarray(image), jnp.asarray(rms)
  if image.ndim != 4 or image.shape[1] != 1 or rms.shape != image.shape:
    raise ValueError(f'image and rms must both be (B, 1, H, W); got {image.shape} and {rms.shape}')
  cfg = model_config
  if not isinstance(cfg, ml_collections.FrozenConfigDict):
    cfg = ml_collections.FrozenConfigDict(cfg)
  stride = registry.stride(name, cfg.token_arcsec)
  hgt, wid = image.shape[2:]
  if hgt < stride or wid < stride or hgt % stride or wid % stride:
    raise ValueError(
        f'{name} images must be a whole number of {stride}-px tokens on each side '
        f'({cfg.token_arcsec}" tokens at {registry[name].pixel_scale}"/px); got {hgt} x {wid} '
        f'px: crop or pad them to a multiple of {stride}')
  fn = _representation_fn(cfg, registry, instrument, normalise)
  band_ids = jnp.full((image.shape[0],), registry.band_id(name), jnp.int32)
  return fn(variables, image[:, 0], rms[:, 0], band_ids)


def count_params(tree) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
