"""JEPA predictors: map online tokens (or slots) to the target branch's space.

The predictor is what makes the online/target pair asymmetric (together with the
EMA and stop-gradient on the target), which is one of the guards against collapse.

* 'mlp' (the seeds' design, the reference's D -> 1024 -> D GELU MLP): per token,
  no interaction between tokens.
* 'transformer' (I-JEPA style, optional): a narrow pre-LN transformer
  (D -> dim, `depth` blocks, -> D) over the token sequence, so a token's
  prediction can use its neighbours. Tokens already carry the trunk's position
  embedding, so none is added here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaisp_jax.models import vit

Dtype = Any


class MlpPredictor(nn.Module):
  """(..., D) -> (..., D): Dense(hidden) -> GELU -> Dense(D)."""

  hidden: int = 1024
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = vit.Mlp(self.hidden, x.shape[-1], self.dtype, self.param_dtype, name='mlp')(x)
    return y.astype(jnp.float32)


class TransformerPredictor(nn.Module):
  """(B, N, D) -> (B, N, D) through a narrow transformer of width `dim`."""

  dim: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.dim, kernel_init=vit.dense_init, name='embed', **kw)(x)
    h = vit.block_stack(h, self.depth, self.num_heads, self.mlp_ratio, False,
                        self.dtype, self.param_dtype)
    h = nn.LayerNorm(name='norm', **kw)(h)
    return nn.Dense(d, kernel_init=vit.dense_init, name='out', **kw)(h).astype(jnp.float32)


def make_predictor(cfg, dtype: Dtype, param_dtype: Dtype = jnp.float32, name: str | None = None):
  """Predictor from `config.predictor`; None when kind == 'none'."""
  if cfg.kind == 'mlp':
    return MlpPredictor(cfg.hidden, dtype, param_dtype, name=name)
  if cfg.kind == 'transformer':
    return TransformerPredictor(cfg.dim, cfg.depth, cfg.num_heads, 4.0, dtype, param_dtype,
                                name=name)
  if cfg.kind == 'none':
    return None
  raise ValueError(f"unknown predictor kind {cfg.kind!r}; expected 'mlp', 'transformer' or 'none'")
