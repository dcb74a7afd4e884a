"""The transformers peer of the bench tool: the reference's train step, timed in PyTorch.

The bench (flava_jax/tools/bench.py) runs this module in a child process, so that PyTorch's and
XLA's allocators never share the device:

    python -m flava_jax.tools.peer '{"model": {...}, "dvae": {...}, "kinds": ["paired"], ...}'

For FLAVA it builds transformers' FlavaForPreTraining (with its image codebook) at the sizes of our
config, feeds it random batches of the bench's shapes (the codebook computes the MIM/MMM targets,
as in training); for BLIP (request "family": "blip") the reference's pretraining step on
transformers' BLIP modules (peer_blip.py). It times forward + backward + AdamW, eager and under
torch.compile, with bf16 autocast on CUDA. After each mode it prints one JSON line holding every
mode so far: per mode and kind the step times, PyTorch's FLOP count of one step, peak memory, and
(eager, CUDA only) the largest batch that fits in the memory limit.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from flava_jax.tasks import flava_batches as random_batches


class TorchStep:
  """What every peer's train step shares: the model on the device (under torch.compile or not),
  fused AdamW over its trainable parameters, bf16 autocast, the backward and update, and the
  device synchronisation the timings wait for. A family's step names its model (MODEL), makes
  the bench's random batches as its inputs (`inputs`) and calls `update(loss)`."""

  MODEL = ""

  def __init__(self, request: dict[str, Any], model: Any, device: Any, autocast: bool,
               compiled: bool, weight_decay: float):
    import torch  # pylint: disable=import-outside-toplevel
    self.request, self.torch, self.device, self.autocast = request, torch, device, autocast
    self.model = model.to(device).train()
    self.forward = torch.compile(self.model) if compiled else self.model
    params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=weight_decay,
                                       fused=device.type == "cuda")

  def inputs(self, kind: str, batch: int, seed: int) -> dict[str, Any]:
    """The bench's random batch of `kind` as the step's keyword arguments on the device."""
    raise NotImplementedError

  def autocast_context(self) -> Any:
    return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16,
                               enabled=self.autocast)

  def update(self, loss: Any) -> None:
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)

  def sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()


class PeerStep(TorchStep):
  """One FlavaForPreTraining train step (forward with every loss, backward, AdamW)."""

  MODEL = "transformers FlavaForPreTraining"

  def __init__(self, request: dict[str, Any], device: Any, autocast: bool, compiled: bool):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import FlavaForPreTraining  # pylint: disable=import-outside-toplevel
    from flava_jax.convert import config_to_transformers  # pylint: disable=import-outside-toplevel
    from flava_jax.models import config as flava_config  # pylint: disable=import-outside-toplevel
    hf_config = config_to_transformers(flava_config.FlavaConfig.from_dict(request["model"]),
                                       flava_config.DVAEConfig.from_dict(request["dvae"]))
    torch.manual_seed(0)
    super().__init__(request, FlavaForPreTraining(hf_config), device, autocast, compiled,
                     weight_decay=0.1)

  def inputs(self, kind: str, batch: int, seed: int) -> dict[str, Any]:
    shapes = random_batches.BatchShapes(**self.request["shapes"])
    ours = random_batches.random_batch(kind, batch, shapes, seed)
    inputs = random_batches.transformers_inputs(kind, ours, shapes.itm_negative_rate, seed)
    return {k: self.torch.from_numpy(v).to(self.device) for k, v in inputs.items()}

  def __call__(self, inputs: dict[str, Any]) -> None:
    with self.autocast_context():
      loss = self.forward(**inputs, return_loss=True).loss
    self.update(loss)


def _time(fn: Callable[[], None], sync: Callable[[], None], steps: int, warmup: int
          ) -> list[float]:
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return times


def _flops(step: TorchStep, inputs: dict[str, Any]) -> float:
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  counter = FlopCounterMode(display=False)
  with counter:
    step(inputs)
  return float(counter.get_total_flops())


def _fits(step: TorchStep, kind: str, batch: int) -> float | None:
  """Peak bytes of one step at `batch`, or None when it runs out of memory."""
  torch = step.torch
  try:
    inputs = step.inputs(kind, batch, 1)
    torch.cuda.reset_peak_memory_stats()
    step(inputs)
    step.sync()
    return float(torch.cuda.max_memory_allocated())
  except torch.OutOfMemoryError:
    return None
  finally:
    step.optimizer.zero_grad(set_to_none=True)
    inputs = None
    torch.cuda.empty_cache()


def largest_batch(step: TorchStep, kind: str, start: int, limit: float) -> dict[str, Any]:
  """The largest batch (a multiple of 8) whose eager step fits in `limit` bytes: peak memory is
  linear in the batch, so two measured points predict it, then runs confirm it."""
  high = start
  while high >= 16 and _fits(step, kind, high) is None:
    high //= 2
  low = high // 2
  high_peak, low_peak = (_fits(step, kind, b) for b in (high, low))
  if high_peak is None or low_peak is None or high_peak <= low_peak:
    return {"batch": None, "note": f"no linear fit from batches {low} and {high}"}
  per_example = (high_peak - low_peak) / (high - low)
  fixed = high_peak - per_example * high
  batch = int((limit - fixed) / per_example) // 8 * 8
  while batch >= 8:
    peak = _fits(step, kind, batch)
    if peak is not None and peak <= limit:
      return {"batch": batch, "peak_bytes": peak, "per_example_bytes": per_example,
              "fixed_bytes": fixed}
    batch = int(batch * 0.95) // 8 * 8
  return {"batch": None, "note": "not even 8 rows fit"}


def step_class(request: dict[str, Any]) -> type[TorchStep]:
  """The train step of the request's family ("family": flava, the default, or blip)."""
  if request.get("family", "flava") == "blip":
    from flava_jax.tools import peer_blip  # pylint: disable=import-outside-toplevel
    return peer_blip.BlipPeerStep
  return PeerStep


def run(request: dict[str, Any], report: Callable[[dict[str, Any]], None] | None = None
        ) -> dict[str, Any]:
  """Every mode's timings; `report` gets the result so far after each mode."""
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  autocast = device.type == "cuda" and request.get("autocast", True)
  limit = request.get("memory_limit_bytes") or 0
  if device.type == "cuda":
    total = torch.cuda.get_device_properties(device).total_memory
    limit = min(limit or total, total)
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
  result: dict[str, Any] = {
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "torch": torch.__version__, "autocast_bf16": autocast, "modes": {},
      "model": step_class(request).MODEL}
  for mode in request["modes"]:
    try:
      result["modes"][mode] = _run_mode(mode, request, device, autocast, limit)
    except Exception as e:  # pylint: disable=broad-except  (one mode failing keeps the others)
      result["modes"][mode] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    if device.type == "cuda":
      torch.cuda.empty_cache()
    if report is not None:  # what is done so far, should the parent stop this process later
      report(result)
  return result


def _run_mode(mode: str, request: dict[str, Any], device: Any, autocast: bool, limit: float
              ) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  batch = request["batch"]
  step = step_class(request)(request, device, autocast, compiled=mode == "compile")
  per_kind = {}
  for kind in request["kinds"]:
    inputs = step.inputs(kind, batch, 0)
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    # torch.compile compiles on the first calls: two more untimed steps
    times = _time(lambda: step(inputs), step.sync, request["steps"],  # pylint: disable=cell-var-from-loop
                  request["warmup"] + (2 if mode == "compile" else 0))
    entry = {"step_seconds": statistics.median(times), "min_seconds": min(times),
             "max_seconds": max(times), "steps": len(times)}
    if device.type == "cuda":
      entry["peak_bytes"] = float(torch.cuda.max_memory_allocated())
    if mode == "eager":
      entry["flops_per_step"] = _flops(step, inputs)
    per_kind[kind] = entry
    inputs = None
  if mode == "eager" and device.type == "cuda":
    for kind in request.get("max_batch_kinds", []):
      per_kind.setdefault(kind, {})["largest_batch"] = largest_batch(
          step, kind, batch, limit)
  return per_kind


def main(argv: list[str]) -> None:
  request = json.loads(argv[1])
  # One line per finished mode, each holding all so far: the bench reads the last one, also
  # from a peer it stopped at its time limit.
  run(request, lambda result: print("PEER_RESULT " + json.dumps(result), flush=True))


if __name__ == "__main__":
  main(sys.argv)
