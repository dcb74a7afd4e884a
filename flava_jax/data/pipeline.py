"""The training input pipeline: config -> an iterator of per-step batches, checkpointable.

    corpus source (sources.py) -> shuffle, repeat (one global order, reshuffled every epoch)
      -> per-example transform with its own rng (preprocess.py; bad examples marked)
      -> this process's rows of every global batch (ProcessRows)
      -> read threads -> batches that drop and count bad examples -> weighted per-step mixture
      -> grain worker processes (data.worker_count) -> DataIterator (state, skip totals)

`make_pipeline(data, corpora, processors, global_batch, seed)` takes the parsed `config.data`
(`data_config`) and one per-example processor per corpus kind, which the task makes (its
`processors`; `make_processor` builds FLAVA-style ones from `Shapes`). `DataIterator.get_state()` is a JSON-able dict the trainer
stores in its checkpoint; `set_state` resumes the exact batch sequence. `to_global` turns a host's
batch into global jax Arrays laid out over the mesh's data-parallel axes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

import grain
from absl import flags
import jax
import numpy as np

from flava_jax import sharding, stopping
from flava_jax.data import embedded, masking, sources, transforms
from flava_jax.data.mixture import (CORPUS_KEY, SKIPPED_KEY, SkipCountingBatchIterDataset,
                                    WeightedMixtureIterDataset)
from flava_jax.data.preprocess import (KINDS, AudioTextProcessor, ExampleProcessor,
                                       ImageTextProcessor, TrimodalProcessor)
from flava_jax.data.tokenizer import Tokenizer
from flava_jax.parse import check_choice, dataclass_from_dict

@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """One corpus of the mixture: its kind, weight and source (sources.SourceConfig's fields)."""

  kind: str = "paired"
  weight: float = 1.0
  source: str = "embedded"
  name: str = ""
  split: str = "train"
  paths: str = ""
  data_dir: str = ""
  fields: dict = dataclasses.field(
      default_factory=lambda: {k: k for k in sources.CANONICAL_FIELDS})

  def source_config(self, cache_dir: str) -> sources.SourceConfig:
    return sources.SourceConfig(source=self.source, name=self.name, split=self.split,
                                paths=self.paths, data_dir=self.data_dir, cache_dir=cache_dir,
                                fields=dict(self.fields))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpora: dict = dataclasses.field(default_factory=dict)  # name -> CorpusConfig fields
  vocab_file: str = ""  # a BERT vocab.txt; "" = the embedded corpus's own vocabulary
  lowercase: bool = True
  cache_dir: str = ""  # embedded corpus cache ("" = $FLAVA_JAX_CACHE or ~/.cache/flava_jax)
  crop_scale: tuple = (0.9, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  horizontal_flip: bool = False
  # Read by image-caption processors (preprocess.ImageTextProcessor: BLIP) only; FLAVA-style
  # processors refuse them. randaugment: (n, m) or () for none; caption_max_words: 0 = no cut.
  randaugment: tuple = ()
  clean_captions: bool = False
  caption_max_words: int = 0
  fast_decode: bool = False  # JPEG DCT-domain downscaling of large images (transforms.py)
  max_pixels: int = 100_000_000
  max_text_bytes: int = 1 << 20
  mask_patches: int = 75  # BEiT block masking: patches masked per image
  mask_min_block: int = 16
  mask_min_aspect: float = 0.3
  mlm_rate: float = 0.15
  mlm_mask_fraction: float = 0.8
  mlm_random_fraction: float = 0.1
  worker_count: int = 0  # grain worker processes (0: transform in this process)
  worker_buffer_size: int = 2  # batches each worker keeps ready
  read_threads: int = 8  # threads per process reading and transforming examples (0: none)
  read_buffer_size: int = 64  # examples those threads keep ready per corpus
  max_consecutive_skips: int = 10_000
  # Read by audio processors (preprocess.AudioTextProcessor) only: SpecAugment-style time masks
  # per training example (spans of up to audio_mask_width samples zeroed; 0: none), and the
  # longest recording read before its crop (longer: skipped as audio_too_long).
  audio_time_masks: int = 0
  audio_mask_width: int = 1600
  max_audio_seconds: float = 600.0


def data_config(values: Mapping[str, Any], prefix: str = "data") -> tuple[DataConfig,
                                                                        dict[str, CorpusConfig]]:
  """Validated DataConfig and its corpora; bad fields are errors that name them."""
  cfg = dataclass_from_dict(DataConfig, values, prefix)
  corpora = {}
  if not cfg.corpora:
    raise ValueError(f"{prefix}.corpora is empty: name at least one corpus")
  for name, fields in cfg.corpora.items():
    where = f"{prefix}.corpora.{name}"
    corpus = dataclass_from_dict(CorpusConfig, fields, where)
    check_choice(f"{where}.kind", corpus.kind, KINDS)
    check_choice(f"{where}.source", corpus.source, sources.SOURCE_KINDS)
    if not corpus.weight > 0:
      raise ValueError(f"{where}.weight={corpus.weight} must be positive")
    unknown = set(corpus.fields) - set(sources.CANONICAL_FIELDS)
    if unknown:
      raise ValueError(f"{where}.fields has unknown names {sorted(unknown)}; "
                       f"use {sources.CANONICAL_FIELDS}")
    corpora[name] = corpus
  for name in ("worker_count", "read_threads", "read_buffer_size", "worker_buffer_size"):
    if getattr(cfg, name) < (0 if name in ("worker_count", "read_threads") else 1):
      raise ValueError(f"{prefix}.{name}={getattr(cfg, name)} is out of range")
  return cfg, corpora


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The geometry FLAVA-style processors (make_processor) share with the model and the recipe;
  a task makes it from its parsed config."""

  image_size: int
  patch_size: int
  dvae_size: int  # pixels per side of the dVAE's view (one code per patch)
  paired_text_length: int
  text_length: int
  text_vocab_size: int
  text_pad_id: int
  # MLM positions chosen per row at most (loss.*_prediction_slots; 0: no cap).
  paired_text_predictions: int = 0
  text_predictions: int = 0

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def load_tokenizer(cfg: DataConfig, shapes: Shapes | None = None) -> Tokenizer:
  vocab = cfg.vocab_file or embedded.vocab_file(cfg.cache_dir)
  tok = Tokenizer(vocab, lowercase=cfg.lowercase)
  if shapes is not None:
    if tok.vocab_size > shapes.text_vocab_size:
      raise ValueError(f"data.vocab_file has {tok.vocab_size} tokens but "
                       f"model.text.vocab_size is {shapes.text_vocab_size}")
    if tok.pad_id != shapes.text_pad_id:
      raise ValueError(f"data.vocab_file's [PAD] is id {tok.pad_id} but "
                       f"model.text.pad_token_id is {shapes.text_pad_id}")
  return tok


def make_processor(kind: str, cfg: DataConfig, shapes: Shapes, tok: Tokenizer | None,
                   train: bool = True) -> ExampleProcessor:
  for name in ("randaugment", "clean_captions", "caption_max_words"):
    if getattr(cfg, name):
      raise ValueError(f"data.{name}={getattr(cfg, name)!r} is read by image-caption "
                       "processors (the BLIP task) only; this task's processors ignore it")
  grid = shapes.grid
  block = masking.BlockMaskConfig(grid_size=grid, num_masked=min(cfg.mask_patches, grid * grid),
                                  min_block=cfg.mask_min_block, min_aspect=cfg.mask_min_aspect)
  image = transforms.ImageTransformConfig(
      image_size=shapes.image_size, dvae_size=shapes.dvae_size, crop_scale=tuple(cfg.crop_scale),
      crop_ratio=tuple(cfg.crop_ratio), horizontal_flip=cfg.horizontal_flip,
      fast_decode=cfg.fast_decode,
      max_pixels=cfg.max_pixels)
  mlm = None
  if tok is not None:
    mlm = masking.TokenMaskConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                                  special_ids=tok.special_ids, rate=cfg.mlm_rate,
                                  mask_fraction=cfg.mlm_mask_fraction,
                                  random_fraction=cfg.mlm_random_fraction,
                                  whole_word=kind == "paired",  # MMM-text: whole words
                                  max_predictions=(shapes.paired_text_predictions
                                                   if kind == "paired" else
                                                   shapes.text_predictions))
  length = shapes.paired_text_length if kind == "paired" else shapes.text_length
  return ExampleProcessor(kind=kind, image=image, block_mask=block,
                          tokenizer=tok if kind != "image" else None, text_length=length,
                          mlm=mlm if kind != "image" else None, max_text_bytes=cfg.max_text_bytes,
                          train=train)


def _stable_hash(name: str) -> int:
  return int.from_bytes(name.encode("utf-8")[:8].ljust(8, b"\0"), "little") % (2**31)


class EpochShuffle(grain.MapDataset):
  """The parent in a new random order every epoch, repeated without end (or one epoch).

  Epoch e's order is a permutation drawn from (seed, e) and kept for the epoch; it costs a few
  microseconds per element where grain's Feistel index shuffle costs about half a millisecond,
  at 4 bytes per record of the corpus (8 beyond 2**31 records) per process and worker.
  """

  def __init__(self, parent: grain.MapDataset, seed: int, repeat: bool = True):
    super().__init__(parent)
    self._size = len(parent)
    self._seed = seed
    self._repeat = repeat
    # The last two epochs' orders (read threads straddle an epoch boundary), replaced as one
    # tuple so that concurrent readers never see one epoch's order under another's number.
    self._orders = ()

  def __len__(self) -> int:
    return sys.maxsize if self._repeat else self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self._size)
    if not self._repeat and epoch:
      raise IndexError(index)
    orders = self._orders
    order = next((o for e, o in orders if e == epoch), None)
    if order is None:
      order = np.random.default_rng([self._seed, epoch]).permutation(self._size)
      if self._size < 2**31:  # half the memory: every process holds the whole corpus's order
        order = order.astype(np.int32)
      self._orders = ((epoch, order),) + orders[:1]
    return self._parent[int(order[position])]

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed}, repeat={self._repeat})"


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: element i is the parent's element
  ((i // rows) * process_count + process_index) * rows + i % rows.

  The parent is the whole corpus in its global order (the same on every process); a global
  batch of `rows * process_count` consecutive elements is split into one run of `rows` per
  process, in process order (the order make_array_from_process_local_data lays them out). So
  the processes read disjoint parts that together are the whole corpus, and a global batch holds
  the same examples, in the same rows, whatever the number of processes.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int,
               rows: int):
    super().__init__(parent)
    self._index, self._count, self._rows = process_index, process_count, rows
    whole, rest = divmod(len(parent), rows * process_count)
    self._size = whole * rows + min(max(rest - process_index * rows, 0), rows)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= self._size:
      raise IndexError(index)
    return self._parent[global_position(index, self._index, self._count, self._rows)]

  def __str__(self) -> str:
    return f"ProcessRows({self._index} of {self._count}, rows={self._rows})"


def global_position(index: int, process_index: int, process_count: int, rows: int) -> int:
  """The corpus position of element `index` of a process's stream (ProcessRows)."""
  chunk, row = divmod(index, rows)
  return (chunk * process_count + process_index) * rows + row


def corpus_examples(source: sources.Source, processor: ExampleProcessor, seed: int,
                    process_index: int, process_count: int, rows: int = 1,
                    shuffle: bool = True, repeat: bool = True) -> grain.MapDataset:
  """This process's rows of one corpus, shuffled (one global order per epoch), repeated, each
  example transformed with an rng drawn from its global position: the same examples, masks and
  crops in the same global batches for any number of processes."""
  if len(source) < process_count:
    raise ValueError(f"{source.where}: {len(source)} records cannot feed {process_count} "
                     "processes")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = EpochShuffle(ds, seed, repeat)
  elif repeat:
    ds = ds.repeat()
  ds = ds.random_map(processor, seed=seed + 1)
  return ProcessRows(ds, process_index, process_count, rows) if process_count > 1 else ds


class DataIterator(grain.DatasetIterator):
  """Per-step batches with their corpus, kind and skip counts; state is a JSON-able dict.

  Counters, all totals since the run began (they are part of the state, so a resumed run
  carries them on); counted on this process's share of the data:
    skipped  {"corpus/reason": examples skipped}  (bad records, undecodable images, ...)
    seen     {corpus: examples read}: the ones delivered in batches plus the ones skipped
    batches  {corpus: batches delivered}
  `skip_rates()` -> {corpus: skipped / seen}, the share of what a corpus read that was thrown
  away (0.0 for a clean corpus), for every corpus read so far: what a progress line shows.

  A grain DatasetIterator, so grain's Orbax handler saves it in a checkpoint as it is:
  `ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator), ...)`.
  """

  def __init__(self, dataset: grain.IterDataset, kinds: Mapping[str, str], rows: int = 0,
               process_count: int = 1):
    self._iterator = iter(dataset)
    super().__init__(self._iterator)
    self.kinds = dict(kinds)
    self.rows = rows  # per batch, on this process
    self.process_count = process_count
    self.skipped = collections.Counter()  # "corpus/reason" -> examples skipped so far
    self.seen = collections.Counter()  # corpus -> examples read so far (delivered + skipped)
    self.batches = collections.Counter()  # corpus -> batches delivered so far
    self._seen_unknown = False  # resumed from a state saved before `seen` was kept

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> tuple[str, dict[str, np.ndarray]]:
    """(corpus name, {key: host-local numpy array})."""
    batch = next(self._iterator)
    corpus = batch.pop(CORPUS_KEY)
    skipped = batch.pop(SKIPPED_KEY)
    rows = len(next(iter(batch.values()))) if batch else 0
    if self._seen_unknown:  # every batch of a run has the same rows: rebuild the totals
      self._seen_unknown = False
      for name, count in self.batches.items():
        self.seen[name] = count * rows + self._skipped_of(name)
    for reason, count in skipped.items():
      self.skipped[f"{corpus}/{reason}"] += count
    self.seen[corpus] += rows + sum(skipped.values())
    self.batches[corpus] += 1
    return corpus, batch

  def _skipped_of(self, corpus: str) -> int:
    return sum(v for k, v in self.skipped.items() if k.partition("/")[0] == corpus)

  def skip_rates(self) -> dict[str, float]:
    """{corpus: fraction of the examples it read that were skipped} for every corpus read so far
    (skipped / seen; 0.0 when nothing was skipped), in corpus name order."""
    return {name: self._skipped_of(name) / seen
            for name, seen in sorted(self.seen.items()) if seen}

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "skipped": dict(self.skipped),
            "seen": dict(self.seen), "batches": dict(self.batches), "rows": self.rows,
            "process_count": self.process_count}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(state["grain"])
    self.skipped = collections.Counter(state["skipped"])
    self.batches = collections.Counter(state["batches"])
    self.seen = collections.Counter(state.get("seen", {}))
    self._seen_unknown = "seen" not in state

  def close(self) -> None:
    """Stops grain's worker processes (also done when the iterator is collected)."""
    super().close()


def carry_over_state(states: list[Mapping[str, Any]], process_index: int, process_count: int,
                     rows: int) -> dict:
  """The data state of process `process_index` of `process_count` (`rows` per batch) from the
  states all the processes of a job of another shape (process count or global batch) saved,
  in process order.

  The mixture's step carries over as it is (it is global). Each corpus resumes at the furthest
  position any old process had reached in the corpus's global order; with several processes
  now, rounded up to a whole global batch. With no skipped examples and the same global batch
  that is exactly where the old job stopped: the data order goes on as if the job had never
  changed size. With skips, the few examples between an old process's position and the
  furthest one are not read this epoch. The old job's counters go to process 0 (the job's
  totals are the sum over its processes).
  """
  if not states:
    raise ValueError("no data states to carry over")
  old_count = len(states)
  mixtures = [s["grain"] for s in states]
  if not all(isinstance(m, Mapping) and set(m) == {"step", "corpora"} for m in mixtures):
    raise ValueError("the data states were saved with data.worker_count > 0 (one state per "
                     "worker): they cannot move to another number of processes or global "
                     f"batch; resume with {old_count} process(es) and the same global_batch")
  steps = {m["step"] for m in mixtures}
  if len(steps) != 1:
    raise ValueError(f"the saved data states disagree on the step: {sorted(steps)}")
  global_batch = rows * process_count
  corpora = {}
  for name in mixtures[0]["corpora"]:
    reached = 0
    for p, (state, m) in enumerate(zip(states, mixtures)):
      taken = m["corpora"][name]["next_index"]
      old_rows = state.get("rows") or global_batch // old_count
      if taken:
        reached = max(reached, global_position(taken - 1, p, old_count, old_rows) + 1)
    if process_count > 1:
      reached = -(-reached // global_batch) * rows
    corpora[name] = {"next_index": reached}
  out = {"grain": {"step": steps.pop(), "corpora": corpora}, "rows": rows,
         "process_count": process_count, "skipped": {}, "seen": {}, "batches": {}}
  if process_index == 0:
    for key in ("skipped", "seen", "batches"):
      total = collections.Counter()
      for s in states:
        total.update(s.get(key, {}))
      out[key] = dict(total)
  return out


def state_to_json(state: Mapping[str, Any]) -> str:
  return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict:
  return json.loads(text)


def make_pipeline(cfg: DataConfig, corpora: Mapping[str, CorpusConfig],
                  processors: Mapping[str, Any], global_batch: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> DataIterator:
  """The training pipeline: each corpus read through the processor of its kind, mixed per step.

  cfg, corpora: `data_config(config.data)`; processors: {corpus kind: per-example processor}
  (the task's); every process builds `global_batch / process_count` rows per step.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} is not divisible by the "
                     f"{process_count} processes")
  host_batch = global_batch // process_count
  streams, weights, kinds = {}, {}, {}
  read_options = grain.ReadOptions(num_threads=cfg.read_threads,
                                   prefetch_buffer_size=cfg.read_buffer_size)
  for name, corpus in corpora.items():
    where = f"data.corpora.{name}"
    # kind: an array_record folder contributes its shards of this corpus's kind
    source = sources.open_source(corpus.source_config(cfg.cache_dir), where, corpus.kind)
    source.check(corpus.kind)
    corpus_seed = seed * 1_000_003 + _stable_hash(name)
    examples = corpus_examples(source, processors[corpus.kind], corpus_seed, process_index,
                               process_count, host_batch)
    streams[name] = SkipCountingBatchIterDataset(
        examples.to_iter_dataset(read_options), host_batch, name, cfg.max_consecutive_skips)
    weights[name] = corpus.weight
    kinds[name] = corpus.kind
  dataset = WeightedMixtureIterDataset(streams, weights, seed=seed)
  if cfg.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; notebooks never parse them
      flags.FLAGS.mark_as_parsed()
    # Ctrl-C reaches the workers too (a terminal signals the whole process group): they leave
    # it to the main process, which saves and stops (flava_jax/stopping.py).
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size),
        worker_init_fn=stopping.ignore_interrupts)
  return DataIterator(dataset, kinds, host_batch, process_count)


def image_text_processor(cfg: DataConfig, image_size: int, tok: Tokenizer, text_length: int,
                         train: bool = True, prompt: str = "") -> ImageTextProcessor:
  """An image-caption processor (BLIP's data) from the data settings; `prompt` is prepended to
  every caption (BLIP's captioning fine-tuning)."""
  return ImageTextProcessor(prompt=prompt, 
      image_size=image_size, tokenizer=tok, text_length=text_length,
      crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
      horizontal_flip=cfg.horizontal_flip, randaugment=tuple(cfg.randaugment),
      max_words=cfg.caption_max_words, clean_captions=cfg.clean_captions,
      max_pixels=cfg.max_pixels, max_text_bytes=cfg.max_text_bytes, train=train)


def audio_text_processor(cfg: DataConfig, kind: str, samples: int, tok: Tokenizer,
                         text_length: int, train: bool = True) -> AudioTextProcessor:
  """An audio-caption processor (audio and trimodal corpora) from the data settings."""
  if cfg.audio_time_masks < 0 or cfg.audio_mask_width < 1 or not cfg.max_audio_seconds > 0:
    raise ValueError("data.audio_time_masks must be >= 0, data.audio_mask_width >= 1 and "
                     "data.max_audio_seconds > 0")
  return AudioTextProcessor(samples=samples, tokenizer=tok, text_length=text_length,
                            time_masks=cfg.audio_time_masks, mask_width=cfg.audio_mask_width,
                            max_audio_seconds=cfg.max_audio_seconds,
                            max_text_bytes=cfg.max_text_bytes, train=train, kind=kind)


def trimodal_processor(cfg: DataConfig, shapes: Shapes, tok: Tokenizer, samples: int, frames,
                       train: bool = True, patch_rate: float = 0.15, frame_rate: float = 0.15,
                       modality_rate: float = 0.3) -> TrimodalProcessor:
  """An image-caption-audio processor (the tri-modal pretrainer) from the data settings: the
  image views and MLM from the same fields as FLAVA's processors, the audio window from
  max_audio_seconds; the patch, frame and modality rates are the task's."""
  image = transforms.ImageTransformConfig(
      image_size=shapes.image_size, dvae_size=shapes.dvae_size, crop_scale=tuple(cfg.crop_scale),
      crop_ratio=tuple(cfg.crop_ratio), horizontal_flip=cfg.horizontal_flip,
      fast_decode=cfg.fast_decode, max_pixels=cfg.max_pixels)
  mlm = masking.TokenMaskConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                                special_ids=tok.special_ids, rate=cfg.mlm_rate,
                                mask_fraction=cfg.mlm_mask_fraction,
                                random_fraction=cfg.mlm_random_fraction)
  return TrimodalProcessor(image=image, grid=shapes.grid, tokenizer=tok,
                           text_length=shapes.paired_text_length, mlm=mlm, samples=samples,
                           frames=frames, patch_rate=patch_rate, frame_rate=frame_rate,
                           modality_rate=modality_rate, max_audio_seconds=cfg.max_audio_seconds,
                           max_text_bytes=cfg.max_text_bytes, train=train)


def flava_processors(cfg: DataConfig, kinds, shapes: Shapes, train: bool = True
                     ) -> dict[str, ExampleProcessor]:
  """make_processor for each of `kinds`, with the tokenizer loaded (and checked against the
  model's vocabulary) when a kind reads text."""
  tok = None
  if any(k != "image" for k in kinds):
    tok = load_tokenizer(cfg, shapes)
  return {k: make_processor(k, cfg, shapes, tok, train) for k in sorted(set(kinds))}


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A host's rows -> global arrays split over the data-parallel axes (every process calls it)."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}
