"""Compile a task's train steps for a TPU topology on any machine; print what one chip needs.

    python -m flava_jax.tools.aot --config=configs/flava.py:full --topology=v5p:8x8x4 \\
        --config.global_batch=8192

Lowers and compiles the sharded train step of every batch kind of the config's task (FLAVA:
paired, image, text) for abstract TPU devices (libtpu + jax.experimental.topologies; no TPU
needed), then prints per-chip memory (arguments, outputs, temporaries, total), FLOPs per step
from XLA's cost analysis beside the analytic count, and with --shardings the sharding of every
parameter. This is how to size a run before reserving the slice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from flava_jax import experiment, sharding

# Dense bf16 peak per chip, for the ideal step time, and HBM per chip (GiB), for --max_batch.
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass
class StepReport:
  kind: str
  batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  xla_flops_per_chip: float
  analytic_flops_per_step: float
  error: str = ""  # set when the step does not fit on a chip

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @classmethod
  def from_compiled(cls, kind: str, batch: int, compiled: Any, analytic_flops: float
                    ) -> "StepReport":
    """XLA's memory and cost analyses of a compiled step."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return cls(kind=kind, batch=batch, argument_bytes=memory.argument_size_in_bytes,
               output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
               temp_bytes=memory.temp_size_in_bytes,
               xla_flops_per_chip=float(cost.get("flops", float("nan"))),
               analytic_flops_per_step=analytic_flops)


def tpu_devices(topology: str) -> list[Any]:
  """Abstract devices of a TPU topology such as "v5p:2x2x1" (needs libtpu, not a TPU)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.split(":")[0] + "-8")
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topology!r} (is libtpu installed? see "
                       f"requirements-test.txt): {e}") from e


def compile_steps(config: Any, devices: list[Any], kinds: tuple[str, ...] | None = None
                  ) -> tuple[list[StepReport], Any]:
  """Lowers and compiles each kind's train step for `devices` (default: the step kinds of the
  config's corpora); returns reports and the parameters' shardings."""
  exp = experiment.Experiment(config, devices)
  kinds = exp.step_kinds() if kinds is None else kinds
  state, state_shardings = exp.abstract_state()
  frozen = exp.abstract_frozen()
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(exp.mesh))
  batch_size = exp.run.global_batch
  reports = []
  for kind in kinds:
    step = exp.train_step(kind)
    with jax.set_mesh(exp.mesh):
      lowered = step.jitted.lower(state, frozen, exp.abstract_batch(kind, batch_size), rng)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      reports.append(StepReport(kind, batch_size, 0, 0, 0, 0, float("nan"), 0.0,
                                error=str(e).split("\n")[0]))
      continue
    reports.append(StepReport.from_compiled(kind, batch_size, compiled,
                                            exp.step_flops(kind)))
  return reports, state_shardings.params


def compiled_bytes(config: Any, devices: list[Any], kind: str, batch: int) -> float:
  """XLA's memory per device for one step of `batch` rows (inf where the compiler says it does
  not fit); compiled, not run."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.global_batch = batch
  report = compile_steps(config, devices, (kind,))[0][0]
  return float("inf") if report.error else float(report.total_bytes)


def largest_batch(config: Any, devices: list[Any], kind: str, start: int, limit_bytes: float
                  ) -> dict[str, Any]:
  """The largest global batch, a multiple of 8 x the data-parallel size, whose step XLA lays out
  in `limit_bytes` per device. Memory is linear in the batch: compiles at `start` and 2 x start
  predict it, then compiles confirm it (or step down)."""
  unit = 8 * sharding.data_parallel_size(sharding.make_mesh(config.sharding.mesh, devices))
  start = max(unit, start // unit * unit)
  first, second = (compiled_bytes(config, devices, kind, b) for b in (start, 2 * start))
  per_example = (second - first) / start
  fixed = first - per_example * start
  if not np.isfinite(per_example) or per_example <= 0:
    return {"batch": None, "note": f"memory not linear in the batch ({first}, {second} bytes)"}
  batch = int((limit_bytes - fixed) / per_example) // unit * unit
  need = float("inf")
  for _ in range(4):  # the prediction, then smaller batches until XLA confirms one fits
    if batch < unit:
      break
    need = compiled_bytes(config, devices, kind, batch)
    if need <= limit_bytes:
      break
    batch = int(batch * limit_bytes / need) // unit * unit
  if not need <= limit_bytes:
    return {"batch": None, "note": f"no batch of {unit} rows or more found to fit"}
  return {"batch": batch, "compiled_bytes": need, "per_example_bytes": per_example,
          "fixed_bytes": fixed}


def _scanned(config: Any) -> bool:
  """Whether some layer stack of the config's model runs as a loop (XLA counts it once)."""
  model = config.get("model") or {}
  layers = [v.get("num_layers", 0) for v in model.values() if hasattr(v, "get")]
  return bool(layers) and model.get("scan_unroll", 1) < max(layers)


def _gib(n: float) -> str:
  return f"{n / 2**30:8.2f} GiB"


def format_report(reports: list[StepReport], topology: str, num_chips: int, mesh: dict,
                  scanned: bool = False) -> str:
  lines = [f"topology {topology}: {num_chips} chips, mesh {mesh}"]
  if scanned:
    lines.append("note: XLA counts a scanned layer stack's loop body once, so its FLOPs are low; "
                 "--config.model.scan_unroll=99 unrolls the stacks for a full count (slower "
                 "compile)")
  peak = PEAK_FLOPS.get(topology.split(":")[0])
  for r in reports:
    per_chip = r.analytic_flops_per_step / num_chips
    lines.append(f"[{r.kind}] global batch {r.batch}")
    if r.error:
      lines.append(f"  DOES NOT FIT: {r.error}")
      continue
    lines.append(f"  memory per chip: arguments {_gib(r.argument_bytes)}, outputs "
                 f"{_gib(r.output_bytes)} (aliased {_gib(r.alias_bytes)}), temporaries "
                 f"{_gib(r.temp_bytes)}, total {_gib(r.total_bytes)}")
    lines.append(f"  FLOPs per step: XLA {r.xla_flops_per_chip * num_chips / 1e12:.4g} TFLOP "
                 f"({r.xla_flops_per_chip / 1e12:.4g} per chip), analytic "
                 f"{r.analytic_flops_per_step / 1e12:.4g} TFLOP ({per_chip / 1e12:.4g} per chip)")
    if peak:
      lines.append(f"  ideal step time at peak ({peak / 1e12:.0f} TFLOP/s per chip): "
                   f"{per_chip / peak * 1e3:.3g} ms")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = f.config
  devices = tpu_devices(f.topology)
  kinds = None if f.kinds == ["all"] else tuple(f.kinds)
  reports, param_shardings = compile_steps(config, devices, kinds)
  kinds = tuple(r.kind for r in reports)
  mesh = dict(sharding.make_mesh(config.sharding.mesh, devices).shape)
  print(format_report(reports, f.topology, len(devices), mesh, scanned=_scanned(config)))
  if f.max_batch:
    limit = HBM_GIB[f.topology.split(":")[0]] * 2**30
    for kind in kinds:
      found = largest_batch(config, devices, kind, config.global_batch, limit)
      per_chip = found["batch"] // len(devices) if found["batch"] else None
      print(f"[{kind}] largest global batch in {limit / 2**30:.0f} GiB per chip: "
            f"{found['batch']} ({per_chip} per chip; compiled "
            f"{found.get('compiled_bytes', float('nan')) / 2**30:.2f} GiB) {found.get('note', '')}")
  if f.shardings:
    print("parameter shardings (mesh axes per dimension):")
    for path, spec in sharding.describe(param_shardings).items():
      print(f"  {path:<80s} {spec}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  _REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "flava.py"),
                                  "config file, e.g. configs/flava.py:full")
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:8x8x4 or v5e:4x4")
  flags.DEFINE_list("kinds", ["all"], "batch kinds to compile (FLAVA: paired,image,text) or "
                    "all (those of the config's corpora)")
  flags.DEFINE_bool("shardings", True, "print every parameter's sharding")
  flags.DEFINE_bool("max_batch", False, "also find the largest batch that fits a chip's HBM "
                    "(three or four more compiles per kind)")
  app.run(main)
