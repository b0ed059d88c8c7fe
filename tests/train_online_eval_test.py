"""Held-out retrieval figure of the train loop: what a collapsed encoder scores."""

import numpy as np

from jaisp_jax.train import online_eval


def test_retrieval_top_k_counts_ties_against_the_query():
  rng = np.random.default_rng(0)
  # A collapsed encoder: every embedding equal. Ties must not count as hits.
  same = np.ones((8, 4))
  assert online_eval.retrieval_top_k(same, same, 1) == 0.0
  assert online_eval.retrieval_top_k(same, same, 5) == 0.0
  # A perfect encoder (the gallery is the query, plus a little noise).
  q = rng.normal(size=(8, 4))
  assert online_eval.retrieval_top_k(q, q + 1e-3 * rng.normal(size=q.shape), 1) == 1.0
  # Gallery row 0 duplicated into row 1: query 1 ties with row 0 and loses top-1,
  # keeps top-2; query 0 ties with row 1 likewise.
  g = q.copy()
  g[1] = g[0]
  q2 = g.copy()
  assert online_eval.retrieval_top_k(q2, g, 1) == 6 / 8
  assert online_eval.retrieval_top_k(q2, g, 2) == 1.0
