"""DETR-style object decoder (seed 002): learnable queries -> object slots.

Q learnable object queries attend to each other (self-attention: queries compete
for objects), then to the trunk's tokens (cross-attention: each query looks for
"its" object in the image), then an FFN; `depth` such pre-LN layers. The slots of
two views are matched by the objectives (Hungarian assignment on cosine cost).

Outputs per view: slot embeddings (B, Q, D), the last layer's cross-attention map
averaged over heads (B, Q, N) -- where each slot looks, i.e. an implicit position
-- and a per-slot objectness logit (B, Q). Nothing supervises objectness here;
the objectives may e.g. regress it on the information mass under the slot's
attention, or use sigmoid(objectness) to weight matched pairs.

Cross-attention is computed explicitly (einsum + softmax) because its maps are an
output; with Q = 100 and N ~ 64-256 tokens it is a small cost next to the trunk.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaisp_jax.models import vit

Dtype = Any


class CrossAttention(nn.Module):
  """Multi-head attention of queries x (B, Q, D) to memory m (B, N, D).

  Returns (output (B, Q, D), attention (B, H, Q, N) float32).
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, m):
    b, q_len, d = x.shape
    n = m.shape[1]
    hd = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=vit.dense_init)
    q = nn.Dense(d, name='q', **kw)(x).reshape(b, q_len, self.num_heads, hd)
    kv = nn.Dense(2 * d, name='kv', **kw)(m).reshape(b, n, 2, self.num_heads, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum('bqhd,bnhd->bhqn', q, k).astype(jnp.float32) / jnp.sqrt(float(hd))
    attn = jax.nn.softmax(logits, axis=-1)  # (B, H, Q, N)
    y = jnp.einsum('bhqn,bnhd->bqhd', attn.astype(self.dtype), v).reshape(b, q_len, d)
    return nn.Dense(d, name='proj', **kw)(y), attn


class DecoderLayer(nn.Module):
  """Pre-LN: x + SA(LN x); x + CA(LN x, memory); x + FFN(LN x)."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + vit.SelfAttention(self.num_heads, name='self_attn', **kw)(
        nn.LayerNorm(name='norm1', **kw)(x))
    y, attn = CrossAttention(self.num_heads, name='cross_attn', **kw)(
        nn.LayerNorm(name='norm2', **kw)(x), memory)
    x = x + y
    mlp = vit.Mlp(int(d * self.mlp_ratio), d, name='mlp', **kw)
    x = x + mlp(nn.LayerNorm(name='norm3', **kw)(x))
    return x, attn


class DetrDecoder(nn.Module):
  """Q object queries decoded against trunk tokens (B, N, D).

  Returns {'slots': (B, Q, D), 'attn': (B, Q, N), 'objectness': (B, Q)} (float32).
  """

  num_queries: int = 100
  depth: int = 3
  num_heads: int = 8
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    b, _, d = tokens.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries = self.param('queries', nn.initializers.normal(1.0), (self.num_queries, d),
                         self.param_dtype)
    x = jnp.broadcast_to(queries.astype(self.dtype)[None], (b, self.num_queries, d))
    memory = tokens.astype(self.dtype)
    attn = None
    for i in range(self.depth):
      x, attn = DecoderLayer(self.num_heads, self.mlp_ratio, name=f'layer_{i}', **kw)(x, memory)
    x = nn.LayerNorm(name='norm', **kw)(x)
    objectness = nn.Dense(1, name='objectness', **kw)(x)[..., 0]
    return {'slots': x.astype(jnp.float32), 'attn': attn.mean(axis=1),
            'objectness': objectness.astype(jnp.float32)}
