"""What the evaluators share: the model under evaluation, held-out splits read in sharded batches,
and features computed on the mesh and gathered to the host once.

    ctx = EvalContext(model, mesh, rules, tokenizer, text_length)
    params = ctx.place(params)                      # numpy or sharded -> the model's shardings
    out, skipped = ctx.map_split(len(source), prepare, features_fn, batch_size=256)

`prepare(index) -> {name: numpy row}` reads and preprocesses one example on the host (threads);
a bad example raises data.examples.Skip and is counted, never silently dropped. Rows are batched
per process (each process takes every process_count-th example), padded to whole global batches,
laid over the data-parallel axes and run through `features_fn(params, batch)` under jit. The
outputs of every batch are gathered once, at the end, and returned in the split's order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flava_jax import multihost, sharding
from flava_jax.data import audio, pipeline, sources, transforms
from flava_jax.data.examples import Skip, as_image_bytes, as_text
from flava_jax.data.preprocess import pick_one
from flava_jax.data.tokenizer import Tokenizer
from flava_jax.parse import dataclass_from_dict

Array = jax.Array
INDEX_KEY = "index"  # the example's position in its split; -1 marks padding rows


def row_or_skip(prepare: Callable[[Any], dict[str, np.ndarray]]
                ) -> Callable[[Any], dict[str, np.ndarray] | str]:
  """`prepare` returning its row, or the skip reason (a str) of an example it cannot use."""
  def guarded(index):
    try:
      return prepare(index)
    except Skip as e:
      return e.reason
  return guarded


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Fields every evaluator config has (evaluators add their own)."""

  evaluator: str = ""
  every_steps: int = 0  # in a training run: every this many steps (0: only at the end)
  batch_size: int = 256  # global batch of the feature passes
  text_length: int = 0  # tokens per text (0: the model's training length for captions)
  read_threads: int = 8  # host threads decoding and tokenising examples


def source_config(values: Mapping[str, Any], where: str, cache_dir: str = ""
                  ) -> sources.SourceConfig:
  """A split's SourceConfig from its config mapping (source, name, split, paths, fields...)."""
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  values.setdefault("cache_dir", cache_dir)
  try:
    return dataclass_from_dict(sources.SourceConfig, values, where)
  except (ValueError, TypeError) as e:
    raise type(e)(f"{where}: {e}") from None


def open_split(values: Mapping[str, Any], needed: tuple[str, ...], where: str,
               cache_dir: str = "") -> sources.Source:
  """Opens one held-out split and checks that its records have the fields `needed`.

  An array_record folder contributes the shards of the builder kind whose records hold those
  fields (paired for image + caption, image for image + label; sources.kind_for_fields), or, when
  no kind fits (VQA, sentence pairs), the one set of shards it holds.
  """
  source = sources.open_source(source_config(values, where, cache_dir), where,
                               sources.kind_for_fields(needed))
  source.check_fields(needed, "this evaluator")
  return source


class Predictor(Protocol):
  """What evaluators call on a model (the task's `predict()`): features of uint8 images and of
  token ids, as pure functions of the parameters (called inside jit)."""

  image_size: int          # pixels per side of the encoder's view
  text_length: int         # the model's default tokens per text (its training caption length)
  text_vocab_size: int
  max_text_length: int

  def logical_axes(self) -> Any: ...
  def image_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]: ...
  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]: ...
  def multimodal_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]: ...
  def classifier(self, inputs: str, num_classes: int, hidden_size: int) -> Any: ...
  def classifier_width(self, inputs: str) -> int: ...


@dataclasses.dataclass
class EvalContext:
  """The model being evaluated (its task's predict functions) and where it runs; parameters
  are passed per call."""

  predict: Predictor
  mesh: Mesh
  rules: sharding.Rules
  tokenizer: Tokenizer | None
  text_length: int  # default tokens per text
  max_pixels: int = 100_000_000
  max_text_bytes: int = 1 << 20
  cache_dir: str = ""  # the embedded corpus's cache
  # The task's frozen inputs (the omni task's dVAE), made on first use: () -> replicated arrays.
  load_frozen: Callable[[], Any] | None = None
  # Caches of this context (a dataclasses.replace copy starts its own).
  _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
  _frozen: list = dataclasses.field(default_factory=list, init=False, repr=False, compare=False)

  # --- frozen inputs -------------------------------------------------------------------------

  def frozen(self) -> Any:
    """The task's frozen inputs (loaded once, on the first call)."""
    if not self._frozen:
      if self.load_frozen is None:
        raise ValueError("this evaluation context holds no frozen inputs of the task")
      self._frozen.append(self.load_frozen())
    return self._frozen[0]

  # --- parameters ----------------------------------------------------------------------------

  def param_shardings(self) -> Any:
    return sharding.logical_to_shardings(self.predict.logical_axes(), self.mesh, self.rules)

  def place(self, params: Any) -> Any:
    """The parameters in their shardings on this mesh (a no-op for a training state's)."""
    return jax.device_put(params, self.param_shardings())

  # --- one example -> arrays -----------------------------------------------------------------

  def image_row(self, value: Any) -> dict[str, np.ndarray]:
    """An image field (encoded bytes; the first of a list) -> {"pixels": uint8 [S, S, 3]}."""
    image = transforms.decode_rgb(as_image_bytes(pick_one(value, None)), self.max_pixels)
    return {"pixels": transforms.eval_pixels(image, self.predict.image_size)}

  def audio_row(self, value: Any, max_seconds: float = 600.0) -> dict[str, np.ndarray]:
    """An audio field (encoded bytes) -> {"audio": float32 [N], "audio_mask": int32 [N]}: 16 kHz
    mono, its start cut or zero-padded to the model's audio length (predict.audio_samples)."""
    wave, _ = audio.decode_audio(value, max_seconds=max_seconds)
    wave, mask = audio.crop_or_pad(wave, self.predict.audio_samples)
    return {"audio": wave, "audio_mask": mask}

  def text_row(self, value: Any, length: int = 0, pair: Any = None) -> dict[str, np.ndarray]:
    """A text (and optionally a second text: "[CLS] a [SEP] b [SEP]") -> ids, mask, types."""
    if self.tokenizer is None:
      raise ValueError("this evaluator reads text but the context has no tokenizer")
    length = length or self.text_length
    text = as_text(value, self.max_text_bytes)
    if pair is None:
      ids, mask, _ = self.tokenizer.encode(text, length)
      types = np.zeros_like(ids)
    else:
      ids, mask, types = self.tokenizer.encode_pair(text, as_text(pair, self.max_text_bytes),
                                                    length)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

  # --- features (inside jit) -----------------------------------------------------------------

  def image_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": unit-norm projection [B, P], "cls": final-LN h_CLS_I [B, D]}."""
    return self.predict.image_features(params, batch)

  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": [B, P], "cls": final-LN h_CLS_T [B, D]}."""
    return self.predict.text_features(params, batch)

  def multimodal_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"cls": final-LN h_CLS_M [B, D_mm]} of an image and a text."""
    return self.predict.multimodal_features(params, batch)

  # --- a whole split -------------------------------------------------------------------------

  def global_batch(self, batch_size: int) -> int:
    """batch_size rounded up to a multiple of the data-parallel size and the process count."""
    unit = math.lcm(sharding.data_parallel_size(self.mesh), jax.process_count())
    return max(unit, -(-batch_size // unit) * unit)

  def map_split(self, count: int, prepare: Callable[[int], dict[str, np.ndarray]],
                features_fn: Callable[[Any, Mapping[str, Array]], dict[str, Array]],
                params: Any, batch_size: int = 256, threads: int = 8
                ) -> tuple[dict[str, np.ndarray], collections.Counter]:
    """features_fn over examples 0..count-1 -> ({name: [kept, ...]}, skip counts).

    The outputs of the examples kept, in index order; outputs["index"] says which they are.

    Every process must call it with the same arguments (it takes its own share of the rows);
    the skip counts are the job's.
    """
    batch_size = self.global_batch(batch_size)
    pcount, pindex = jax.process_count(), jax.process_index()
    host_batch = batch_size // pcount
    mine = list(range(pindex, count, pcount))
    per_process = -(-count // pcount)
    steps = max(1, -(-per_process // host_batch))  # the same on every process
    skipped: collections.Counter = collections.Counter()

    safe = row_or_skip(prepare)
    jitted = self._jitted.get(features_fn)  # callers pass the same function on every call
    if jitted is None:
      jitted = jax.jit(lambda p, b: dict(features_fn(p, b), **{INDEX_KEY: b[INDEX_KEY]}))
      self._jitted[features_fn] = jitted
    template = None
    outputs = []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      def submit(step):
        chunk = mine[step * host_batch:(step + 1) * host_batch]
        return [(i, pool.submit(safe, i)) for i in chunk]

      pending = submit(0)
      for step in range(steps):
        current, pending = pending, (submit(step + 1) if step + 1 < steps else [])
        rows, index = [], []
        for i, future in current:
          row = future.result()
          if isinstance(row, str):
            skipped[row] += 1
            continue
          rows.append(row)
          index.append(i)
        if rows and template is None:
          template = {k: np.zeros_like(v) for k, v in rows[0].items()}
        if template is None:  # nothing usable yet: find one row to pad with
          template = self._find_template(count, safe)
        rows += [template] * (host_batch - len(rows))
        index += [-1] * (host_batch - len(index))
        batch = {k: np.stack([r[k] for r in rows]) for k in template}
        batch[INDEX_KEY] = np.asarray(index, np.int32)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
          outputs.append(jitted(params, pipeline.to_global(batch, self.mesh)))
    gathered = multihost_utils.process_allgather(outputs, tiled=True)  # the one host transfer
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
    order = merged[INDEX_KEY]
    keep = np.flatnonzero(order >= 0)
    keep = keep[np.argsort(order[keep], kind="stable")]
    # The job's skip counts (each process counted its own rows).
    return {k: v[keep] for k, v in merged.items()}, collections.Counter(
        multihost.sum_counts(skipped))

  @staticmethod
  def _find_template(count: int, safe: Callable) -> dict[str, np.ndarray]:
    for i in range(count):
      row = safe(i)
      if not isinstance(row, str):
        return {k: np.zeros_like(v) for k, v in row.items()}
    raise ValueError(f"none of the {count} examples of the split could be used")


def load_names(spec: str, embedded_names: Callable[[], tuple[str, ...]], data: Mapping[str, Any],
               field: str, where: str) -> list[str]:
  """Class or answer names in label order: "embedded" (the embedded corpus's), "tfds" (the TFDS
  dataset's ClassLabel names of `field`), or a file (a JSON list, or one name per line)."""
  if spec == "embedded":
    return list(embedded_names())
  if spec == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    path = dict(data.get("fields", {})).get(field, field)
    builder = tfds.builder(data["name"], data_dir=data.get("data_dir") or None)
    return list(builder.info.features[path].names)
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"{where}={spec!r}: use 'embedded', 'tfds' or a file of names")
  with open(spec, encoding="utf-8") as f:
    text = f.read()
  names = json.loads(text) if spec.endswith(".json") else [
      line.strip() for line in text.splitlines() if line.strip()]
  if not names:
    raise ValueError(f"{where}={spec!r} holds no names")
  return [str(n) for n in names]


def split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random (train, validation) partition of range(count), validation ~fraction."""
  order = np.random.default_rng(seed).permutation(count)
  cut = int(round(count * (1.0 - fraction)))
  return np.sort(order[:cut]), np.sort(order[cut:])
