"""jaisp-jax: JAX/Flax training code for JAISP (Joint AI Survey Processing).

A self-supervised foundation model that learns one representation of the sky from
Rubin/LSST and Euclid images of the same sky patches. See README.md.
"""

__version__ = '0.1.0'
