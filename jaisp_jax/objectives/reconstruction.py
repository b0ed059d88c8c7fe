"""Masked-band reconstruction loss: information-weighted, robust, in noise units.

The `masked_band` variant hides one band and predicts its pixels from the others. Per
pixel p of the hidden band::

    r_p   = (pred_p - image_p) / rms_p                    residual in units of the noise
    rho   = sqrt(r^2 + delta^2) - delta                   Charbonnier (smooth L1)
    a_p   = mask_p * (sky_weight + w_p)                   pixel weight
    L     = sum_p a_p rho(r_p) / sum_p a_p

* Noise units: a residual of 1 is one sigma whatever the band's depth, so deep and
  shallow bands, bright and faint pixels are judged on the same scale.
* Charbonnier with ``delta = 1`` (one sigma): quadratic inside the noise, linear beyond
  it, so a cosmic ray, a bad column or a saturated core the model cannot (and should
  not) predict pulls with a bounded gradient (at most ``a_p / (rms_p sum a)``) instead
  of dominating the batch.
* Information weight ``w`` (the information map of the hidden band, ~1 on sources, ~0
  on sky): as in the token JEPA, the ~90 % of empty sky must not dominate. A small
  ``sky_weight`` floor remains because, unlike the latent losses, a decoder given zero
  weight on sky could paint flux there at no cost.
* ``mask == 0`` pixels (unobserved, rms 0) are excluded and never divided by.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaisp_jax.objectives import jepa


def charbonnier(x: jax.Array, delta: float = 1.0) -> jax.Array:
  """sqrt(x^2 + delta^2) - delta: ~x^2 / (2 delta) for |x| << delta, ~|x| beyond."""
  return jnp.sqrt(jnp.square(x) + delta * delta) - delta


def masked_band_loss(pred: jax.Array, image: jax.Array, rms: jax.Array,
                     mask: jax.Array, weights: Optional[jax.Array] = None, *,
                     delta: float = 1.0, sky_weight: float = 0.1
                     ) -> tuple[jax.Array, dict]:
  """Information-weighted Charbonnier loss of a reconstructed band, in rms units.

  Args:
    pred: (B, H, W) or (B, 1, H, W) predicted pixels, same units as ``image``.
    image, rms, mask: the hidden band's pixels, noise and validity (1 observed, 0 not),
      same shape as ``pred``.
    weights: optional per-pixel information weights (same shape), treated as data (no
      gradient). None: uniform (``sky_weight`` is then irrelevant).
    delta: Charbonnier transition, in sigmas.
    sky_weight: weight floor added to ``weights`` (see the module docstring).

  Returns:
    (loss, metrics): ``recon_chi2`` (mean r^2 over observed pixels, ~1 means
    reconstructed to the noise) and ``recon_valid_frac``.
  """
  pred = pred.astype(jnp.float32)
  mask = jax.lax.stop_gradient(mask).astype(jnp.float32)
  observed = mask > 0
  safe_rms = jnp.where(observed, rms.astype(jnp.float32), 1.0)
  r = jnp.where(observed, (pred - image.astype(jnp.float32)) / safe_rms, 0.0)
  if weights is None:
    a = mask
  else:
    a = mask * (sky_weight + jax.lax.stop_gradient(weights).astype(jnp.float32))
  loss = jepa.safe_ratio(jnp.sum(a * charbonnier(r, delta)), jnp.sum(a))
  n_obs = jnp.sum(mask)
  metrics = dict(
      recon_chi2=jax.lax.stop_gradient(jepa.safe_ratio(jnp.sum(mask * r * r), n_obs)),
      recon_valid_frac=n_obs / mask.size)
  return loss, metrics
