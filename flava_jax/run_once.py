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

# Also XLA's older loop emitters instead of its fusion emitters: on the tiny FLAVA step (8 CPU
# devices, LLVM's passes already off) the compile takes 6-7 s instead of 9-10 s, the step runs as
# fast and its loss prints the same.
CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
               "xla_cpu_use_fusion_emitters": False}
# XLA's own defaults for the same options: the optimised CPU backend every step compiles with.
OPTIMISED_CPU_OPTIONS = {"xla_backend_optimization_level": 3,
                         "xla_llvm_disable_expensive_passes": False,
                         "xla_cpu_use_fusion_emitters": True}


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
