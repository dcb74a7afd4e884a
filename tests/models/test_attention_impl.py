"""attention_impl=auto: XLA's attention off GPU, and a fallback where cuDNN is refused."""

import jax.numpy as jnp
import numpy as np
from absl import logging

from flava_jax.models import transformer


def _inputs():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 20, 4, 16)), jnp.bfloat16) for _ in range(3))
  return q, k, v, jnp.asarray(np.arange(20)[None] < np.array([[20], [7]]))


def test_auto_is_xla_on_this_backend():
  assert transformer.auto_attention_impl(jnp.bfloat16) == "xla"  # CPU tests
  q, k, v, mask = _inputs()
  np.testing.assert_array_equal(transformer.attention_kernel(q, k, v, mask, "auto"),
                                transformer.attention_kernel(q, k, v, mask, "xla"))


def test_auto_falls_back_to_xla_when_cudnn_is_refused(monkeypatch):
  """Where auto picks cuDNN but cuDNN refuses (here: no cuDNN on a CPU), it warns and uses XLA."""
  monkeypatch.setattr(transformer, "auto_attention_impl", lambda dtype: "cudnn")
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda message, *a: warnings.append(message % a))
  transformer._warn_once.cache_clear()  # pylint: disable=protected-access
  q, k, v, mask = _inputs()
  np.testing.assert_array_equal(transformer.attention_kernel(q, k, v, mask, "auto"),
                                transformer.attention_kernel(q, k, v, mask, "xla"))
  assert len(warnings) == 1 and "cuDNN attention unavailable" in warnings[0]
