"""Train-step speed and memory of any task on this machine's devices, beside a PyTorch peer.

    python -m flava_jax.tools.bench --config=configs/flava.py:full --batch=128 --text_len=77 \\
        [--peer=transformers] [--kinds=paired] [--max_batch] [--memory_limit_gib=79.6]

For each batch kind of the config's task (FLAVA's paired: GC + MMM + ITM with the dVAE's
targets; image: MIM; text: MLM) it compiles the sharded, donated train step on random batches of
the config's shapes, runs warm-up steps, then times steps one by one with the device
synchronised and prints: examples/s, the median step time, FLOPs per step (analytic, and XLA's
cost analysis, which counts a scanned layer stack's body once), TFLOP/s, MFU against the
device's bf16 peak and peak device memory.
--max_batch finds the largest batch whose step fits in the device memory (or
--memory_limit_gib): compiled memory is linear in the batch, so two compiles predict it, a
third checks it and one step runs it. --peer=transformers also times the reference's step in
PyTorch in a child process (FLAVA: transformers' FlavaForPreTraining; BLIP: the reference's
pretraining step on transformers' BLIP modules; eager and torch.compile, bf16 autocast on CUDA;
flava_jax/tools/peer.py) on the same shapes and prints the ratios. --json_out writes every
figure. Nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app

from flava_jax import binary, experiment, multihost
from flava_jax import flops as flop_counts
from flava_jax.models.transformer import auto_attention_impl, dtype_of
from flava_jax.tasks import StepContext
from flava_jax.tools import aot

_GIB = 2.0**30


@dataclasses.dataclass
class StepTiming:
  """What one timed train step costs."""

  name: str  # "flava_jax", "transformers eager", "transformers compile"
  kind: str
  batch: int
  step_seconds: float  # median
  min_seconds: float
  max_seconds: float
  steps: int
  flops_per_step: float = 0.0  # analytic (ours) or PyTorch's flop counter (the peer)
  xla_flops_per_step: float = float("nan")
  peak_bytes: float | None = None  # the device's peak over the run
  compiled_bytes: float | None = None  # XLA's memory analysis: arguments + outputs + temps
  num_devices: int = 1
  peak_flops_per_device: float | None = None

  @property
  def examples_per_second(self) -> float:
    return self.batch / self.step_seconds

  @property
  def tflops_per_device(self) -> float:
    return self.flops_per_step / self.step_seconds / self.num_devices / 1e12

  @property
  def mfu(self) -> float | None:
    if not self.peak_flops_per_device:
      return None
    return self.tflops_per_device * 1e12 / self.peak_flops_per_device

  def to_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), examples_per_second=self.examples_per_second,
                tflops_per_device=self.tflops_per_device, mfu=self.mfu)


def bench_config(config: Any, batch: int, text_len: int, mlm_text_len: int) -> Any:
  """The config with the bench's batch and text lengths (0 keeps the config's; the text
  lengths where the task has them)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.global_batch = batch or config.global_batch
    if "paired_text_length" in config:
      config.paired_text_length = text_len or config.paired_text_length
    if "text_length" in config:
      config.text_length = mlm_text_len or config.text_length
    loss = config.get("loss")
    if loss is not None and "paired_text_prediction_slots" in loss:
      loss.paired_text_prediction_slots = min(loss.paired_text_prediction_slots,
                                              config.paired_text_length)
      loss.text_prediction_slots = min(loss.get("text_prediction_slots", 0), config.text_length)
  return config


class Bench:
  """A config's experiment (task, optimizer, mesh, frozen inputs) and train steps built from it."""

  def __init__(self, config: Any, devices: list[Any] | None = None):
    self.config = config
    self.exp = experiment.Experiment(config, devices)
    self.task, self.devices, self.mesh = self.exp.task, self.exp.devices, self.exp.mesh
    self.rules = self.exp.rules
    self._state = None
    self.frozen = None

  @property
  def data_parallel(self) -> int:
    return self.exp.data_parallel

  def state(self):
    if self._state is None:
      self._state = self.exp.create_state(jax.random.key(0, impl="rbg"))
      self.frozen = self.exp.frozen(self.exp.step_kinds())
    return self._state

  def step(self, kind: str, batch: int):
    self.state()
    return self.exp.train_step(kind, global_batch=batch)

  def batch(self, kind: str, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    return self.exp.random_batch(kind, batch, seed)

  def compile(self, kind: str, batch: int) -> tuple[Any, dict[str, jax.Array]]:
    """The compiled step for `batch` rows and a device batch for it."""
    step, rng = self.step(kind, batch), jax.random.key(0)
    arrays = self.batch(kind, batch)
    with jax.set_mesh(self.mesh):
      compiled = step.jitted.lower(self.state(), self.frozen, arrays, rng).compile()
    return compiled, arrays

  def run(self, compiled: Any, arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One step; the state is donated and replaced."""
    with jax.set_mesh(self.mesh):
      self._state, metrics = compiled(self._state, self.frozen, arrays, jax.random.key(0))
    return metrics

  def time(self, kind: str, batch: int, steps: int, warmup: int, profile_dir: str = ""
           ) -> StepTiming:
    """Times `steps` steps after `warmup`; with profile_dir, traces 3 more (jax.profiler)."""
    compiled, arrays = self.compile(kind, batch)
    for _ in range(warmup):
      jax.block_until_ready(self.run(compiled, arrays))
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready((self.run(compiled, arrays), self._state))
      times.append(time.perf_counter() - start)
    if profile_dir:
      with jax.profiler.trace(os.path.join(profile_dir, kind)):
        for _ in range(3):
          jax.block_until_ready(self.run(compiled, arrays))
    loss = float(self.run(compiled, arrays)["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"the {kind} step's loss is {loss} on random data")
    report = aot.StepReport.from_compiled(kind, batch, compiled, self.exp.step_flops(kind, batch))
    return StepTiming(
        name="flava_jax", kind=kind, batch=batch, step_seconds=statistics.median(times),
        min_seconds=min(times), max_seconds=max(times), steps=steps,
        flops_per_step=report.analytic_flops_per_step,
        xla_flops_per_step=report.xla_flops_per_chip * len(self.devices),
        peak_bytes=peak_device_bytes(self.devices), compiled_bytes=float(report.total_bytes),
        num_devices=len(self.devices),
        peak_flops_per_device=flop_counts.peak_flops_per_device(self.devices[0]))

  def compiled_bytes(self, kind: str, batch: int) -> float:
    """XLA's memory per device for a step of `batch` rows (compiled, not run)."""
    return aot.compiled_bytes(self.config, self.devices, kind, batch)

  def largest_batch(self, kind: str, start: int, limit_bytes: float, run: bool = True
                    ) -> dict[str, Any]:
    """aot.largest_batch on these devices; with run, one real step at that batch too."""
    result = aot.largest_batch(self.config, self.devices, kind, start, limit_bytes)
    if run and result["batch"]:  # what the analysis promised must also execute
      compiled, arrays = self.compile(kind, result["batch"])
      jax.block_until_ready(self.run(compiled, arrays))
      result["ran"] = True
      result["peak_bytes"] = peak_device_bytes(self.devices)
    return result


def attention_check(bench: Bench, impl: str, kind: str, batch: int = 8) -> dict[str, float]:
  """The `kind` loss with XLA's attention and with `impl` (e.g. cuDNN's) on the bench's current
  parameters and one batch: a fast kernel must not change the numbers. The parameters do not
  depend on the attention kernel, so both tasks share them."""
  state, arrays = bench.state(), bench.batch(kind, batch)
  ctx = StepContext(mesh=bench.mesh, local_batch=batch // bench.data_parallel, step=state.step)
  losses = {}
  for name in ("xla", impl):
    task = bench.task.replace(attention_impl=name)
    loss_fn = lambda p, f, b, r, task=task: task.loss(kind, p, state.extra, f, b, r, ctx).loss
    with jax.set_mesh(bench.mesh), nn.logical_axis_rules(list(bench.rules)):
      losses[name] = float(jax.jit(loss_fn)(state.params, bench.frozen, arrays,
                                            jax.random.key(0)))
  return losses


def peak_device_bytes(devices: list[Any]) -> float | None:
  """The largest per-device peak of memory in use, where the runtime reports it (GPU, TPU)."""
  peaks = []
  for device in devices:
    if device.process_index != jax.process_index():  # another process's: not ours to read
      continue
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(float(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def device_memory_limit(devices: list[Any]) -> float | None:
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def run_peer(config: Any, kinds: tuple[str, ...], modes: tuple[str, ...], steps: int,
             warmup: int, max_batch_kinds: tuple[str, ...], memory_limit: float | None,
             timeout: float = 3600) -> dict[str, Any]:
  """The task's PyTorch peer timed in a child process (flava_jax/tools/peer.py)."""
  task = experiment.parse(config)[1]
  peer = task.peer_request() if hasattr(task, "peer_request") else None
  if peer is None:
    raise RuntimeError(f"the {task.NAME} task has no PyTorch peer")
  request = dict(peer, kinds=list(kinds), modes=list(modes), batch=config.global_batch,
                 steps=steps, warmup=warmup, max_batch_kinds=list(max_batch_kinds),
                 memory_limit_bytes=memory_limit)
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child's jax (config code) stays off the GPU
  try:
    proc = subprocess.run([sys.executable, "-m", "flava_jax.tools.peer", json.dumps(request)],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    stdout, stderr, failure = proc.stdout, proc.stderr, f"exit {proc.returncode}"
  except subprocess.TimeoutExpired as e:  # keep the modes it finished
    stdout, stderr = _text(e.stdout), _text(e.stderr)
    failure = f"stopped after {timeout:.0f} s"
  results = [line for line in stdout.splitlines() if line.startswith("PEER_RESULT ")]
  if results:
    result = json.loads(results[-1][len("PEER_RESULT "):])
    for mode in modes:
      result["modes"].setdefault(mode, {"error": f"not finished: {failure}"})
    return result
  raise RuntimeError(f"the PyTorch peer failed ({failure}):\n{stderr[-4000:]}")


def _text(output: bytes | str | None) -> str:
  return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def peer_timings(result: dict[str, Any], batch: int, peak_flops: float | None
                 ) -> list[StepTiming]:
  timings = []
  for mode, per_kind in result["modes"].items():
    if "error" in per_kind:
      print(f"peer: transformers {mode} failed: {per_kind['error']}")
      continue
    for kind, entry in per_kind.items():
      if "step_seconds" not in entry:
        continue
      timings.append(StepTiming(
          name=f"transformers {mode}", kind=kind, batch=batch, step_seconds=entry["step_seconds"],
          min_seconds=entry["min_seconds"], max_seconds=entry["max_seconds"],
          steps=entry["steps"], flops_per_step=entry.get("flops_per_step", 0.0),
          peak_bytes=entry.get("peak_bytes"), peak_flops_per_device=peak_flops))
  return timings


def _gib(value: float | None) -> str:
  return "n/a" if value is None else f"{value / _GIB:.2f} GiB"


def _flop_text(value: float, unit: str = "FLOP") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
    if value >= scale:
      return f"{value / scale:.4g} {prefix}{unit}"
  return f"{value:.4g} {unit}"


def format_timing(t: StepTiming) -> str:
  parts = [f"[{t.kind}] {t.name}: {t.examples_per_second:,.1f} examples/s, step "
           f"{t.step_seconds * 1e3:.2f} ms (median of {t.steps}; {t.min_seconds * 1e3:.2f}-"
           f"{t.max_seconds * 1e3:.2f})"]
  if t.flops_per_step:
    label = "analytic" if t.name == "flava_jax" else "torch flop counter"
    parts.append(f"{_flop_text(t.flops_per_step)}/step ({label}, "
                 f"{_flop_text(t.flops_per_step / t.batch)}/example)")
  if np.isfinite(t.xla_flops_per_step):
    parts.append(f"XLA {_flop_text(t.xla_flops_per_step)}/step")
  if t.flops_per_step:
    parts.append(f"{_flop_text(t.tflops_per_device * 1e12, 'FLOP/s')} per device")
  if t.mfu is not None:
    parts.append(f"MFU {100 * t.mfu:.1f}%")
  parts.append(f"peak memory {_gib(t.peak_bytes)}")
  if t.compiled_bytes is not None:
    parts.append(f"compiled {_gib(t.compiled_bytes)} per device")
  return ", ".join(parts)


def format_ratios(timings: list[StepTiming]) -> list[str]:
  ours = {t.kind: t for t in timings if t.name == "flava_jax"}
  lines = []
  for t in timings:
    if t.name != "flava_jax" and t.kind in ours:
      ratio = ours[t.kind].examples_per_second / t.examples_per_second
      lines.append(f"[{t.kind}] flava_jax / {t.name}: {ratio:.2f}x examples/s")
  return lines


def markdown_rows(timings: list[StepTiming], device: str, config: Any, date: str) -> list[str]:
  """One performance-table row per batch kind: ours, the peer's modes, the ratio, our MFU."""
  rows = []
  for ours in (t for t in timings if t.name == "flava_jax"):
    peers = {t.name: t for t in timings if t.kind == ours.kind and t.name != "flava_jax"}
    eager, compiled = peers.get("transformers eager"), peers.get("transformers compile")
    cell = lambda t: f"{t.examples_per_second:,.0f}" if t else "-"  # noqa: E731
    ratio = f"{ours.examples_per_second / compiled.examples_per_second:.2f}x" if compiled else "-"
    mfu = f"{100 * ours.mfu:.1f}%" if ours.mfu is not None else "-"
    length = config.get("paired_text_length" if ours.kind == "paired" else "text_length")
    shapes = f"{config.get('variant', '')}, batch {ours.batch}" + (
        f", text {length}" if length else "")
    rows.append(f"| {device} | {shapes} | {ours.kind} | "
                f"{cell(ours)} | {cell(eager)} | {cell(compiled)} | {ratio} | {mfu} | {date} |")
  return rows


def model_setting(config: Any, name: str, default: Any) -> Any:
  model = config.get("model")
  return model.get(name, default) if model is not None else default


def describe_config(config: Any, bench: Bench) -> str:
  """The line saying what is benched: task, batch, compute settings and FLAVA's lengths."""
  parts = [f"config {config.get('variant', '')} ({bench.task.NAME}): batch "
           f"{config.global_batch}"]
  parts += [f"{name.replace('_length', '').replace('_', ' ')} {config[name]}"
            for name in ("paired_text_length", "text_length") if name in config]
  parts += [f"{name} {model_setting(config, name, '-')}"
            for name in ("dtype", "attention_impl", "remat_policy", "scan_unroll")]
  loss = config.get("loss")
  if loss is not None and "image_prediction_slots" in loss:
    parts.append(f"prediction slots {loss.image_prediction_slots}/"
                 f"{loss.paired_text_prediction_slots}/{loss.text_prediction_slots}")
  return ", ".join(parts)


def describe_devices(devices: list[Any]) -> str:
  peak = flop_counts.peak_flops_per_device(devices[0])
  text = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
  return text + (f", bf16 peak {peak / 1e12:.0f} TFLOP/s each" if peak else ", no known peak")


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  binary.start(argv)  # joins the job's other processes when started by flava_jax.launch
  f = flags.FLAGS
  if jax.process_count() > 1:
    if f.peer:
      raise app.UsageError("--peer times the PyTorch peer on one process: run it without "
                           "flava_jax.launch")
    if not multihost.is_primary():  # every process steps; process 0 reports
      with open(os.devnull, "w", encoding="utf-8") as quiet, contextlib.redirect_stdout(quiet):
        return _bench(f)
  return _bench(f)


def _bench(f):
  config = bench_config(f.config, f.batch, f.text_len, f.mlm_text_len)
  run, task = experiment.parse(config)
  known = task.step_kinds(c.kind for c in run.corpora.values())
  kinds = known if f.kinds == ["all"] else tuple(f.kinds)
  for kind in kinds:
    if kind not in known:
      raise ValueError(f"--kinds: {kind!r} is not one of {known}")
  max_kinds = tuple(k for k in f.max_batch_kinds if k in kinds) if f.max_batch else ()
  limit = f.memory_limit_gib * _GIB if f.memory_limit_gib else None
  results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "batch": config.global_batch,
                             "xla_flags": os.environ.get("XLA_FLAGS", ""),
                             "paired_text_length": config.get("paired_text_length"),
                             "text_length": config.get("text_length"),
                             "variant": config.get("variant", ""),
                             "task": config.get("task", "flava")}
  peer = None

  def write() -> None:  # after each figure: a run cut off still leaves the earlier ones
    if f.json_out and multihost.is_primary():
      with open(f.json_out + ".tmp", "w") as out:
        json.dump(results, out, indent=1)
      os.replace(f.json_out + ".tmp", f.json_out)

  if f.compile_cache_dir:  # a second run (or a later call on a warm machine) skips compiles
    jax.config.update("jax_compilation_cache_dir", f.compile_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if f.peer == "transformers":  # first: the child has the device to itself
    try:
      peer = run_peer(config, kinds, tuple(f.peer_modes), f.steps, f.warmup, max_kinds, limit,
                      f.peer_timeout_s)
      results["peer"] = peer
      write()
    except RuntimeError as e:  # ours is still worth measuring
      print(f"peer: {e}")
      results["peer_error"] = str(e)
  bench = Bench(config)
  results.update(device=bench.devices[0].device_kind, num_devices=len(bench.devices))
  print(f"devices: {describe_devices(bench.devices)}; mesh {dict(bench.mesh.shape)}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(describe_config(config, bench))
  attention = model_setting(config, "attention_impl", "xla")
  if attention == "auto":
    attention = auto_attention_impl(dtype_of(model_setting(config, "dtype", "float32")))
  if aot._scanned(config):  # pylint: disable=protected-access
    print("note: XLA's cost analysis counts a scanned layer stack's body once (its FLOPs are "
          "low); the analytic count is the whole step")
  timings = []
  for kind in kinds:
    timing = bench.time(kind, config.global_batch, f.steps, f.warmup, f.profile_dir)
    timings.append(timing)
    print(format_timing(timing), flush=True)
    results["timings"] = [t.to_dict() for t in timings]
    write()
  if peer is not None:
    print(f"peer: {peer.get('model', 'transformers')} on {peer['device']}, torch {peer['torch']}, "
          f"bf16 autocast {peer['autocast_bf16']}")
    for timing in peer_timings(peer, config.global_batch,
                               flop_counts.peak_flops_per_device(bench.devices[0])):
      timings.append(timing)
      print(format_timing(timing))
    for line in format_ratios(timings):
      print(line)
  results["timings"] = [t.to_dict() for t in timings]
  if f.check_attention and attention != "xla" and hasattr(bench.task, "replace"):
    losses = attention_check(bench, attention, kinds[0])
    results["attention_check"] = losses
    xla, fast = losses["xla"], losses[attention]
    print(f"attention check ({kinds[0]} loss, batch 8, the bench's parameters): xla {xla:.6f}, "
          f"{attention} {fast:.6f}, relative difference {abs(fast - xla) / abs(xla):.2e}")
    write()
  if max_kinds:
    limit = limit or device_memory_limit(bench.devices)
    if limit is None:
      print("largest batch: no device memory limit known here; pass --memory_limit_gib")
    else:
      results["largest_batch"] = {}
      for kind in max_kinds:
        found = bench.largest_batch(kind, config.global_batch, limit,
                                    run=bench.devices[0].platform != "cpu")
        results["largest_batch"][kind] = found
        write()
        line = (f"[{kind}] largest batch in {_gib(limit)}: flava_jax {found['batch']} "
                f"(compiled {_gib(found.get('compiled_bytes'))} per device)")
        theirs = ((peer or {}).get("modes", {}).get("eager", {}).get(kind, {})
                  .get("largest_batch"))
        if theirs:
          line += f", transformers eager {theirs['batch']}"
          if found["batch"] and theirs["batch"]:
            line += f" ({found['batch'] / theirs['batch']:.2f}x)"
        print(line)
  print("results table rows (device | shapes | batch kind | flava_jax | transformers eager | "
        "torch.compile | ours / compile | MFU | date):")
  for row in markdown_rows(timings, bench.devices[0].device_kind, config, results["date"]):
    print(row)
  write()


def define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file("config", os.path.join(repo, "configs", "flava.py"),
                                  "config file, e.g. configs/flava.py:full")
  flags.DEFINE_integer("batch", 0, "global batch per step (0: the config's global_batch)")
  flags.DEFINE_integer("text_len", 0, "paired caption length (0: config.paired_text_length)")
  flags.DEFINE_integer("mlm_text_len", 0, "text-only length (0: config.text_length)")
  flags.DEFINE_list("kinds", ["all"], "batch kinds: paired,image,text or all")
  flags.DEFINE_integer("steps", 20, "timed steps per kind (the median is reported)")
  flags.DEFINE_integer("warmup", 3, "untimed steps after the compile")
  flags.DEFINE_enum("peer", "", ["", "transformers"], "also time this implementation")
  flags.DEFINE_list("peer_modes", ["eager", "compile"], "the peer's modes: eager, compile")
  flags.DEFINE_float("peer_timeout_s", 3600, "stop the peer after this long (the modes it "
                     "finished are kept)")
  flags.DEFINE_bool("max_batch", False, "find the largest batch that fits (ours and the peer's "
                    "eager step)")
  flags.DEFINE_list("max_batch_kinds", ["paired"], "batch kinds --max_batch searches")
  flags.DEFINE_float("memory_limit_gib", 0.0, "device memory to fit in, GiB (0: the device's "
                     "own; an H100 80GB holds 79.6)")
  flags.DEFINE_string("json_out", "", "write every figure to this JSON file")
  flags.DEFINE_string("compile_cache_dir", "", "XLA's persistent compilation cache (\"\": off)")
  flags.DEFINE_string("profile_dir", "", "also trace 3 steps per kind there (TensorBoard's "
                      "profile plugin or Perfetto read it)")
  flags.DEFINE_bool("check_attention", True, "compare the paired loss with XLA's attention "
                    "and the configured one (when it is not xla)")


if __name__ == "__main__":
  # XLA takes 75% of GPU memory by default; the bench wants nearly all of it for the largest
  # batch. The peer runs first in its own process and has returned its memory by then.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  define_flags()
  app.run(main)
