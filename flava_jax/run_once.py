"""jax.jit for programs that run once per process: parameter and state initialisation.

Such a program's compile is all of its cost. On CPU, XLA hands every fusion to LLVM's optimising
passes; for an initialiser (a threefry hash and a distribution transform per parameter) that is
about two thirds of the compile and buys nothing. `jit` turns those passes off on CPU hosts: the
tiny tri-modal model's state compiles in ~10 s instead of ~30 s. Values can differ from the
optimised program's in the last bit (fused multiply-adds); the same program gives the same values
on every run, so resumed and multi-process runs are unaffected. Other backends compile as usual.
"""

import functools
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# XLA's own defaults for the same two options: the optimised CPU backend every step compiles with.
OPTIMISED_CPU_OPTIONS = {"xla_backend_optimization_level": 3,
                         "xla_llvm_disable_expensive_passes": False}


def xla_flags(options: dict[str, Any]) -> str:
  """Compiler options as XLA_FLAGS words ("--name=value"), for a whole process's compiles."""
  return " ".join(f"--{name}={str(value).lower()}" for name, value in options.items())


def compiler_options() -> dict[str, Any] | None:
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else None


def jit(fn: Callable, **kwargs) -> Callable:
  """jax.jit(fn, **kwargs), compiled without LLVM's optimisation passes on CPU. Called inside
  another trace (an initialiser inside the state's own init program), `fn` is traced inline:
  XLA takes compiler options only from the outermost program."""
  jitted = jax.jit(fn, compiler_options=compiler_options(), **kwargs)

  @functools.wraps(fn)
  def call(*args, **kw):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kw))):
      return fn(*args, **kw)
    return jitted(*args, **kw)

  return call
