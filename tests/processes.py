"""The environment of a binary a test starts in a child process: this session's compilation
cache (a child compiles what an earlier child compiled once), float32 matmuls at full precision,
unbuffered output (a test reads it line by line)."""

import os

import jax


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
  return env
