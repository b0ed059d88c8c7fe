"""Shared ViT trunk: pre-LN transformer blocks over a sky-aligned token grid.

The trunk is band-agnostic: it sees stem tokens of any band and any instrument
through the same weights. Position embeddings are 2-D and work for any grid size
(fixed sin-cos computed from (h, w), or a learned table resized to (h, w)), so the
same parameters serve a 64x64 px training crop and a full tile at inference.
Attention goes through `jax.nn.dot_product_attention`. Its own default is XLA's
composed softmax(QK^T)V; `attention='auto'` (the default here) asks for cuDNN's fused
(flash) kernel where that applies (GPU backend, bf16/f16 compute, head dim a multiple
of 8 up to 128, a sequence length cuDNN accepts) and XLA's elsewhere (CPU, TPU,
float32). On an H200 the fused kernel made the base bf16 step 3% faster (17.5 against
18.0 ms) and the ViT-B one 1% (171 against 173 ms): at 64 tokens attention is a few
per cent of the FLOPs (docs/performance.md). `trunk.attention` in the model
config overrides the choice ('xla' or 'cudnn'); 'cudnn_padded' pads the sequences to
a multiple of 64 with the padded keys masked, for lengths cuDNN refuses (65 with a CLS
token; not yet timed on a GPU, so 'auto' still takes XLA's attention there).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax.models import activations

Dtype = Any

# Linear layers of the trunk use the reference's init (trunc-normal, std 0.02).
dense_init = nn.initializers.truncated_normal(stddev=0.02)


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (h*w, dim), row-major token order.

  A quarter of the channels each hold sin(y f), cos(y f), sin(x f), cos(x f) for
  dim/4 geometric frequencies f (MAE / big_vision convention); positions are in
  token units, so a grid of any size gets consistent embeddings.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs dim % 4 == 0, got {dim}')
  y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing='ij')
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
  """2-D position embeddings for an (h, w) grid -> (h*w, D).

  kind 'sincos': fixed, any grid. kind 'learned': a (grid, grid, D) table,
  bicubically resized when the grid differs (ViT fine-tuning convention).
  """

  kind: str = 'sincos'
  learned_grid: int = 8
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: int, w: int, dim: int) -> jax.Array:
    if self.kind == 'sincos':
      return jnp.asarray(sincos_2d(h, w, dim))
    if self.kind == 'learned':
      g = self.learned_grid
      table = self.param('table', nn.initializers.normal(0.02), (g, g, dim), self.param_dtype)
      if (h, w) != (g, g):
        table = jax.image.resize(table, (h, w, dim), method='bicubic')
      return table.reshape(h * w, dim)
    raise ValueError(f"unknown position embedding {self.kind!r}; expected 'sincos' or 'learned'")


ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'cudnn_padded')
_PAD_MULTIPLE = 64  # 'cudnn_padded': sequence lengths rounded up to this


def attention_implementation(requested: str, dtype, head_dim: int) -> str:
  """The implementation `requested` names: 'auto' resolves to 'xla' or 'cudnn' as the
  module docstring says; the others are returned as they are."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {requested!r}; expected one of '
                     f'{ATTENTION_IMPLEMENTATIONS}')
  if requested != 'auto':
    return requested
  fused_ok = (jax.default_backend() == 'gpu'
              and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if fused_ok else 'xla'


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = 'auto'
              ) -> jax.Array:
  """Softmax attention; q (B, T, H, hd), k/v (B, S, H, hd) -> (B, T, H, hd)."""
  impl = attention_implementation(implementation, q.dtype, q.shape[-1])
  if impl == 'cudnn' and implementation == 'auto':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except NotImplementedError:
      # cuDNN refuses some shapes at trace time (on an H200, jax 0.11.2: "Unsupported
      # sequence length Q 65, KV 65", a CLS token on an 8 x 8 grid); 'auto' then
      # takes XLA's attention. An explicit 'cudnn' lets the error through.
      impl = 'xla'
  if impl == 'cudnn_padded':
    return padded_attention(q, k, v, 'cudnn')
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                     multiple: int = _PAD_MULTIPLE) -> jax.Array:
  """`jax.nn.dot_product_attention` on sequences zero-padded to a multiple of `multiple`,
  the padded keys masked out (`key_value_seq_lengths`) and the padded queries dropped.

  For cuDNN's fused kernel, which refuses some lengths (65 = a CLS token on an 8 x 8
  grid, on an H200): 'cudnn_padded' pads 65 -> 128. The same function as unpadded
  attention, values and gradients (tests/models_vit_test.py checks it with XLA's).
  """
  b, t = q.shape[:2]
  s = k.shape[1]
  up = lambda n: -(-n // multiple) * multiple
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, up(n) - n), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(
      pad(q, t), pad(k, s), pad(v, s), implementation=implementation,
      query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32))
  return out[:, :t]


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (as the reference)."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'auto'  # ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x):  # (B, N, D)
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by {self.num_heads} heads')
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=dense_init, name='qkv')(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
    y = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attention)  # (B, N, H, hd)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=dense_init, name='proj')(y.reshape(b, n, d))


class Mlp(nn.Module):
  """Dense(hidden) -> GELU -> Dense(out).

  `gelu` (activations.GELU_FORMS): 'exact' (erf, as PyTorch's default; the reference) or
  'tanh' (the tanh approximation, which XLA:GPU can fuse into the fc1 GEMM as a cuBLASLt
  epilogue; docs/performance.md).
  """

  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  gelu: str = 'exact'

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init)
    x = activations.gelu_form(self.gelu)(nn.Dense(self.hidden, name='fc1', **kw)(x))
    return nn.Dense(self.out, name='fc2', **kw)(x)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'auto'
  gelu: str = 'exact'  # Mlp

  @nn.compact
  def __call__(self, x):  # (B, N, D)
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + SelfAttention(self.num_heads, attention=self.attention, name='attn', **kw)(
        nn.LayerNorm(name='norm1', **kw)(x))
    x = x + Mlp(int(d * self.mlp_ratio), d, name='mlp', gelu=self.gelu, **kw)(
        nn.LayerNorm(name='norm2', **kw)(x))
    return x


def block_stack(x, depth: int, num_heads: int, mlp_ratio: float, remat: bool,
                dtype: Dtype, param_dtype: Dtype, prefix: str = 'block',
                attention: str = 'auto', gelu: str = 'exact'):
  """Applies `depth` Blocks (inside a compact module); `remat` rematerialises each."""
  cls = nn.remat(Block) if remat else Block
  for i in range(depth):
    x = cls(num_heads, mlp_ratio, dtype=dtype, param_dtype=param_dtype, attention=attention,
            gelu=gelu, name=f'{prefix}_{i}')(x)
  return x


class ViT(nn.Module):
  """Transformer trunk over a token grid.

  Input (B, h, w, D) token embeddings (from the stems); output a dict with
  ``tokens`` (B, N=h*w, D) and ``global`` (B, D) (CLS output if `cls_token`,
  else the mean token), both float32 (after the final LayerNorm).
  """

  depth: int = 6
  num_heads: int = 8
  mlp_ratio: float = 4.0
  pos_embed: str = 'sincos'
  learned_pos_grid: int = 8
  cls_token: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'auto'  # ATTENTION_IMPLEMENTATIONS
  gelu: str = 'exact'  # the MLPs' GELU, activations.GELU_FORMS

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    pos = PositionEmbedding(self.pos_embed, self.learned_pos_grid, self.param_dtype,
                            name='pos_embed')(h, w, d)  # (N, D)
    x = x.reshape(b, h * w, d).astype(self.dtype) + pos.astype(self.dtype)[None]
    if self.cls_token:
      cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = block_stack(x, self.depth, self.num_heads, self.mlp_ratio, self.remat,
                    self.dtype, self.param_dtype, attention=self.attention, gelu=self.gelu)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)
    x = x.astype(jnp.float32)
    tokens = x[:, 1:] if self.cls_token else x  # (B, N, D)
    glob = x[:, 0] if self.cls_token else tokens.mean(axis=1)  # (B, D)
    return {'tokens': tokens, 'global': glob}
