"""Test-wide settings: 8 simulated CPU devices, strict rank promotion, quiet TF."""

import os

# Must be set before jax is imported anywhere: sharding tests build meshes of up to 8
# CPU devices; tests that want one device use jax.devices()[:1] explicitly.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
