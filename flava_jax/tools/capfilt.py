"""CapFilt, BLIP's dataset bootstrapping: a captioner writes a caption for every web image, a filter
drops the web and synthetic captions that do not match their image, and the human pairs, the
kept web pairs and the kept synthetic pairs become a new corpus to pretrain on.

    python -m flava_jax.tools.capfilt --config=configs/capfilt.py --pretrained=WORKDIR \
        --workdir=/tmp/capfilt --out=/tmp/bootstrapped
    python -m flava_jax.main --config=configs/blip.py:bootstrapped \
        --config.data.corpora.capfilt.paths=/tmp/bootstrapped --workdir=/tmp/blip_boot

Stages (each resumes where a killed run stopped):
  1. the captioner: the pretrained BLIP (--pretrained: a workdir or a model directory) fine-tuned
     with LM on the human pairs (config.captioner, a training config; WORKDIR/captioner);
  2. the filter: the same with ITC + ITM (config.filter; WORKDIR/filter);
  3. the bootstrapped corpus in --out, shard by shard: the human pairs copied (origin "human"),
     then for each web shard one synthetic caption per image (nucleus sampling, each image's own
     key: fold_in(seed, its index), so a caption does not depend on the batch), the filter's
     ITM match probability of the web and the synthetic caption, and the pairs at or above
     config.threshold written (origin "web" / "synthetic", "match" their probability).
A shard is written under a temporary name and renamed when complete, with its decisions (every
candidate caption, its match and whether it was kept) in decisions/; a restarted run skips the
shards already there, and its output is byte-identical to an uninterrupted run's. The summary
(OUT/paired.summary.json: kept and dropped per origin) is written last. Where the web records
carry their corruption ("noise") and scene (the embedded web part), the summary also measures the
filter: precision and recall of "dropped" against the recorded corruption (web captions) and
against whether the caption is true of the scene (synthetic ones).

Multi-process (--multiprocess): every process runs every stage; batches are split over all of
them (the trainer's and evaluate's way) and process 0 writes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

OUT_KIND = "paired"  # the output's shards: OUT/paired-00000-of-000NN.array_record
SETTINGS_FILE = "capfilt.json"  # what produced the output: a restart must match it
DECISIONS_DIR = "decisions"
ORIGINS = ("human", "web", "synthetic")
STAGES = ("captioner", "filter")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "capfilt.py"),
                                  "a CapFilt config (configs/capfilt.py)", lock_config=True)
  flags.DEFINE_string("pretrained", None, "the pretrained BLIP: a training workdir or model dir")
  flags.DEFINE_string("workdir", None, "where the captioner's and the filter's runs go")
  flags.DEFINE_string("out", None, "the bootstrapped corpus's folder")
  flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize() (pods, SLURM)")


@dataclasses.dataclass(frozen=True)
class Settings:
  """config's fields besides the two training configs."""

  human: dict
  web: dict
  prompt: str = "a picture of "
  top_p: float = 0.9
  top_k: int = 50
  repetition_penalty: float = 1.1
  max_length: int = 20
  min_length: int = 5
  seed: int = 0
  threshold: float = 0.5
  shard_size: int = 1000
  batch_size: int = 256
  read_threads: int = 8

  def validate(self) -> "Settings":
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"config.threshold={self.threshold} must be in [0, 1]")
    for name in ("shard_size", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name}={getattr(self, name)} must be positive")
    return self


CONFIG_FIELDS = ("captioner", "filter", "sharding") + tuple(
    f.name for f in dataclasses.fields(Settings))


def parse(config: Any) -> Settings:
  """The config's own fields, checked (unknown ones named); the training configs are checked
  by the trainer's own start-up checks."""
  from flava_jax import trainer  # pylint: disable=import-outside-toplevel
  from flava_jax.parse import dataclass_from_dict  # pylint: disable=import-outside-toplevel
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(values) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join('config.' + u for u in unknown)}; a CapFilt "
                     f"config has {', '.join(CONFIG_FIELDS)}")
  for stage in STAGES:
    if stage not in values:
      raise ValueError(f"config.{stage} is missing: the {stage}'s training config")
    try:
      trainer.check_config(config[stage])
    except (ValueError, TypeError) as e:
      raise type(e)(f"config.{stage}: {e}") from None
  own = {k: v for k, v in values.items() if k not in STAGES + ("sharding",)}
  return dataclass_from_dict(Settings, own, "config").validate()


# --- stages 1 and 2: the fine-tunes ---------------------------------------------------------


def finished_step(workdir: str) -> int:
  from flava_jax import warm_start  # pylint: disable=import-outside-toplevel
  steps = warm_start.checkpoint_steps(workdir)
  return steps[0] if steps else 0


def finetune(stage_config: Any, pretrained: str, workdir: str, name: str) -> str:
  """Fine-tunes (or resumes, or skips when it is done) one stage from `pretrained`; its workdir."""
  from flava_jax import multihost, trainer  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, name)
  config = stage_config.copy_and_resolve_references()
  with config.unlocked():
    config.init.model_from = pretrained
  total = config.total_steps
  if finished_step(path) >= total:
    multihost.say(f"capfilt: the {name} is trained ({path}, step {total})")
    return path
  multihost.say(f"capfilt: training the {name} in {path} ({total} steps from {pretrained})")
  results = trainer.train_and_evaluate(config, path)
  if "stopped_at" in results:
    raise KeyboardInterrupt(f"the {name}'s training stopped at step {results['stopped_at']}")
  return path


# --- stage 3: the bootstrapped corpus -------------------------------------------------------


def shard_plan(human_count: int, web_count: int, shard_size: int
               ) -> list[tuple[str, int, int]]:
  """[(origin "human" or "web", first record, end)] per output shard, human shards first."""
  plan = []
  for origin, count in (("human", human_count), ("web", web_count)):
    plan += [(origin, start, min(start + shard_size, count))
             for start in range(0, count, shard_size)]
  return plan


def shard_name(index: int, total: int) -> str:
  from flava_jax.data import records  # pylint: disable=import-outside-toplevel
  return os.path.basename(records.shard_paths(os.path.join("x", OUT_KIND), total)[index])


def _text(value: Any) -> str | None:
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  return value if isinstance(value, str) else None


class Bootstrapper:
  """Stage 3 on this process's mesh: the captioner's and the filter's parameters placed once."""

  def __init__(self, settings: Settings, captioner: str, filter_dir: str, sharding_cfg: Any,
               cache_dir: str = ""):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flava_jax import evaluate, sharding  # pylint: disable=import-outside-toplevel
    from flava_jax.evals.features import INDEX_KEY, open_split  # pylint: disable=import-outside-toplevel

    self.settings = settings
    mesh = sharding.make_mesh(sharding_cfg.mesh)
    rules = sharding.rules_from_config(sharding_cfg.rules)
    self.captioner = evaluate.load_checkpoint(captioner, "captioner")
    self.filter = evaluate.load_checkpoint(filter_dir, "filter")
    for what, ckpt, method in (("captioner", self.captioner, "caption"),
                               ("filter", self.filter, "itm_logits")):
      if not hasattr(ckpt.predict, method):
        raise ValueError(f"the {what} ({ckpt.task.NAME}) has no {method}: CapFilt needs BLIP")
    vocab = evaluate.vocabulary(self.captioner, "", "the captioner's vocab_file")
    self.cap_ctx = evaluate.make_context(self.captioner.task, mesh, rules, vocab, cache_dir)
    self.filter_ctx = evaluate.make_context(self.filter.task, mesh, rules, vocab, cache_dir)
    self.cap_params = self.cap_ctx.place(self.captioner.params)
    self.filter_params = self.filter_ctx.place(self.filter.params)
    self.human = open_split(settings.human, ("image", "caption"), "config.human", cache_dir)
    self.web = open_split(settings.web, ("image", "caption"), "config.web", cache_dir)
    predict = self.captioner.predict
    decode = predict.caption_settings(
        method="sample", max_length=settings.max_length, min_length=settings.min_length,
        top_p=settings.top_p, top_k=settings.top_k,
        repetition_penalty=settings.repetition_penalty)
    prompt = predict.caption_prompt(self.cap_ctx.tokenizer, settings.prompt)
    key = jax.random.key(settings.seed)

    def caption(params, batch):  # each image's own key: its record number
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["record"])
      return {"tokens": predict.caption(params, batch, prompt, decode, keys)}

    def match(params, batch):
      logits = self.filter.predict.itm_logits(params, batch)
      return {"match": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]}

    self._caption, self._match, self._index_key = caption, match, INDEX_KEY

  def plan(self) -> list[tuple[str, int, int]]:
    return shard_plan(len(self.human), len(self.web), self.settings.shard_size)

  def human_shard(self, start: int, end: int) -> tuple[list[dict], list[dict]]:
    """(records, decisions) of human pairs start..end-1: copied, none dropped."""
    out, decisions = [], []
    for i in range(start, end):
      example = self.human[i]
      caption = _text(example.get("caption"))
      if "_skip" in example or not isinstance(example.get("image"), bytes) or not caption:
        decisions.append({"index": i, "origin": "human", "kept": False,
                          "reason": example.get("_skip", "missing_image_or_caption")})
        continue
      record = {"image": example["image"], "caption": caption, "origin": "human",
                "id": f"human/{i}"}
      record.update(self._measured(self.human, i))
      out.append(record)
      decisions.append({"index": i, "origin": "human", "kept": True, "caption": caption})
    return out, decisions

  @staticmethod
  def _measured(source: Any, index: int) -> dict:
    """The record's noise and scene, where it carries them (the embedded web and human parts)."""
    try:
      raw = source.record(index)
    except Exception:  # pylint: disable=broad-except  (measurement only)
      return {}
    return {k: raw[k] for k in ("noise", "scene") if isinstance(raw, Mapping) and k in raw}

  def web_shard(self, start: int, end: int) -> tuple[list[dict], list[dict]]:
    """(records, decisions) of web images start..end-1: their web captions and one synthetic
    caption each, kept where the filter's match probability reaches the threshold."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flava_jax.data.examples import Skip  # pylint: disable=import-outside-toplevel
    from flava_jax.evals import captioning  # pylint: disable=import-outside-toplevel

    s, ctx, fctx = self.settings, self.cap_ctx, self.filter_ctx
    count = end - start
    examples = [self.web[start + j] for j in range(count)]

    def decode(example):  # the image's pixels, or why it cannot be used
      try:
        if "_skip" in example:
          raise Skip(example["_skip"])
        return ctx.image_row(example.get("image"))["pixels"]
      except Skip as e:
        return e.reason

    with concurrent.futures.ThreadPoolExecutor(max(1, s.read_threads)) as pool:
      decoded = list(pool.map(decode, examples))
    images = {j: d for j, d in enumerate(decoded) if not isinstance(d, str)}
    bad = {j: d for j, d in enumerate(decoded) if isinstance(d, str)}

    def image_row(j):
      if j in bad:
        raise Skip(bad[j])
      return {"pixels": images[j], "record": np.int32(start + j)}

    out, _ = ctx.map_split(count, image_row, self._caption, self.cap_params, s.batch_size,
                           s.read_threads)
    synthetic = {int(j): captioning.decode_caption(ctx.tokenizer, t)
                 for j, t in zip(out[self._index_key], out["tokens"])}
    # The pairs the filter scores: (image j, its web caption) and (image j, its synthetic one).
    pairs = []
    for j in range(count):
      if j in bad:
        continue
      web_caption = _text(examples[j].get("caption"))
      if web_caption:
        pairs.append((j, "web", web_caption))
      if synthetic.get(j):
        pairs.append((j, "synthetic", synthetic[j]))
    length = fctx.text_length

    def pair_row(p):
      j, _, text = pairs[p]
      return dict(fctx.text_row(text, length), pixels=images[j])

    scored, _ = fctx.map_split(len(pairs), pair_row, self._match, self.filter_params,
                               s.batch_size, s.read_threads)
    match = dict(zip(scored[self._index_key].tolist(), scored["match"].tolist()))
    records, decisions = [], []
    for j in range(count):
      if j in bad:
        decisions.append({"index": start + j, "origin": "web", "kept": False, "reason": bad[j]})
    for p, (j, origin, text) in enumerate(pairs):
      index = start + j
      value = float(match.get(p, 0.0))
      kept = p in match and value >= s.threshold
      measured = self._measured(self.web, index)
      decision = {"index": index, "origin": origin, "caption": text, "match": value,
                  "kept": kept}
      if origin == "web" and "noise" in measured:
        decision["noise"] = _text(measured["noise"])
      if "scene" in measured:
        decision["scene"] = _text(measured["scene"])
      decisions.append(decision)
      if kept:
        records.append(dict({"image": examples[j]["image"], "caption": text, "origin": origin,
                             "match": value, "id": f"{origin}/{index}"}, **measured))
    return records, decisions


def _settings_record(settings: Settings, pretrained: str, captioner: str, filter_dir: str
                     ) -> dict:
  return {"settings": dataclasses.asdict(settings), "pretrained": os.path.abspath(pretrained),
          "captioner": [os.path.abspath(captioner), finished_step(captioner)],
          "filter": [os.path.abspath(filter_dir), finished_step(filter_dir)]}


def check_out(out: str, expected: dict) -> None:
  """--out is empty, or holds this very run's output (its settings file matches)."""
  path = os.path.join(out, SETTINGS_FILE)
  if not os.path.isdir(out) or not os.listdir(out):
    return
  if not os.path.exists(path):
    raise FileExistsError(f"--out={out!r} is not empty and holds no {SETTINGS_FILE}: name a new "
                          "folder for the bootstrapped corpus")
  with open(path, encoding="utf-8") as f:
    found = json.load(f)
  if found != expected:
    changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    raise FileExistsError(f"--out={out!r} holds the output of another CapFilt run (its "
                          f"{', '.join(changed)} differ): name a new folder")


def write_shard(out: str, name: str, records: Sequence[dict], decisions: Sequence[dict]) -> None:
  """The decisions, then the shard under a temporary name, renamed last: a shard that exists
  is complete."""
  from flava_jax.data import records as records_lib  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.join(out, DECISIONS_DIR), exist_ok=True)
  decisions_path = os.path.join(out, DECISIONS_DIR, name.replace(records_lib.SHARD_SUFFIX,
                                                                 ".jsonl"))
  with open(decisions_path + ".tmp", "w", encoding="utf-8") as f:
    for d in decisions:
      f.write(json.dumps(d, sort_keys=True) + "\n")
  os.replace(decisions_path + ".tmp", decisions_path)
  tmp = os.path.join(out, ".partial-" + name.replace(records_lib.SHARD_SUFFIX, ""))
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  file = array_record_module.ArrayRecordWriter(tmp, records_lib.WRITER_OPTIONS)
  for record in records:
    file.write(records_lib.encode_record(record))
  file.close()
  os.replace(tmp, os.path.join(out, name))


def read_decisions(out: str) -> list[dict]:
  rows = []
  folder = os.path.join(out, DECISIONS_DIR)
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    if name.endswith(".jsonl"):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        rows += [json.loads(line) for line in f if line.strip()]
  return rows


def filter_measures(decisions: Sequence[dict]) -> dict[str, Any]:
  """Kept / dropped (and skipped, by reason) per origin, and where the truth is recorded the
  filter's precision and recall of "dropped": against noise != "clean" (web captions) and
  against "the caption is not true of its scene" (synthetic captions, judged by
  data.embedded.caption_fits)."""
  from flava_jax.data import embedded  # pylint: disable=import-outside-toplevel
  counts = {o: collections.Counter() for o in ORIGINS}
  truth = {"web": [], "synthetic": []}
  noise_kinds = collections.defaultdict(collections.Counter)
  for d in decisions:
    if "reason" in d:  # an unreadable record: skipped, not judged by the filter
      counts[d["origin"]]["skipped"] += 1
      counts[d["origin"]][f"skipped/{d['reason']}"] += 1
      continue
    counts[d["origin"]]["kept" if d["kept"] else "dropped"] += 1
    if d["origin"] == "web" and d.get("noise"):
      truth["web"].append((not d["kept"], d["noise"] != "clean"))
      noise_kinds[d["noise"]]["dropped" if not d["kept"] else "kept"] += 1
    elif d["origin"] == "synthetic" and d.get("scene"):
      wrong = not embedded.caption_fits(d["caption"], embedded.scene_from_json(d["scene"]))
      truth["synthetic"].append((not d["kept"], wrong))
  out: dict[str, Any] = {o: dict(c) for o, c in counts.items()}
  for origin, pairs in truth.items():
    if not pairs:
      continue
    dropped_and_bad = sum(1 for d, b in pairs if d and b)
    dropped = sum(1 for d, _ in pairs if d)
    bad = sum(1 for _, b in pairs if b)
    out[f"{origin}_measured"] = {
        "captions": len(pairs), "noisy": bad, "dropped": dropped,
        "precision": dropped_and_bad / dropped if dropped else float("nan"),
        "recall": dropped_and_bad / bad if bad else float("nan")}
  if noise_kinds:
    out["web_by_noise"] = {k: dict(v) for k, v in sorted(noise_kinds.items())}
  return out


def bootstrap(bootstrapper: Bootstrapper, out: str, expected: dict) -> dict[str, Any]:
  """Writes the missing shards of `out` and the summary; returns the summary."""
  from flava_jax import multihost  # pylint: disable=import-outside-toplevel
  plan = bootstrapper.plan()
  primary = multihost.is_primary()
  if primary:
    check_out(out, expected)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SETTINGS_FILE), "w", encoding="utf-8") as f:
      json.dump(expected, f, indent=1, sort_keys=True)
  multihost.barrier("capfilt_out")
  done = json.loads(multihost.broadcast_text(json.dumps(
      [os.path.exists(os.path.join(out, shard_name(i, len(plan)))) for i in range(len(plan))])))
  for i, (origin, start, end) in enumerate(plan):
    name = shard_name(i, len(plan))
    if done[i]:
      multihost.say(f"capfilt: {name} is already written")
      continue
    if origin == "human":
      records, decisions = bootstrapper.human_shard(start, end)
    else:
      records, decisions = bootstrapper.web_shard(start, end)
    if primary:
      write_shard(out, name, records, decisions)
    multihost.barrier(f"capfilt_{i}")
    kept = collections.Counter(r["origin"] for r in records)
    multihost.say(f"capfilt: {name} ({origin} {start}..{end - 1}): kept "
                  + ", ".join(f"{n} {o}" for o, n in sorted(kept.items())))
  summary = dict(kind=OUT_KIND, shards=len(plan), threshold=bootstrapper.settings.threshold,
                 **filter_measures(read_decisions(out)))
  summary["examples"] = sum(summary[o].get("kept", 0) for o in ORIGINS)
  if primary:
    path = os.path.join(out, f"{OUT_KIND}.summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  return summary


def format_summary(summary: Mapping[str, Any]) -> list[str]:
  lines = [f"capfilt: {summary['examples']} pairs in {summary['shards']} shards (threshold "
           f"{summary['threshold']})"]
  for origin in ORIGINS:
    c = summary.get(origin, {})
    skipped = "".join(f", {k} {v}" for k, v in sorted(c.items()) if k.startswith("skipped/"))
    lines.append(f"  {origin}: kept {c.get('kept', 0)}, dropped {c.get('dropped', 0)}{skipped}")
  for origin in ("web", "synthetic"):
    m = summary.get(f"{origin}_measured")
    if m:
      lines.append(f"  filter on {origin} captions: {m['noisy']} of {m['captions']} wrong; "
                   f"dropped {m['dropped']}: precision {m['precision']:.3f}, recall "
                   f"{m['recall']:.3f}")
  for kind, c in summary.get("web_by_noise", {}).items():
    lines.append(f"    web {kind}: dropped {c.get('dropped', 0)}, kept {c.get('kept', 0)}")
  return lines


def run(config: Any, pretrained: str, workdir: str, out: str) -> dict[str, Any]:
  """The three stages; the summary."""
  from flava_jax import multihost, warm_start  # pylint: disable=import-outside-toplevel
  settings = parse(config)
  warm_start.source_kind(pretrained, "--pretrained")
  captioner = finetune(config.captioner, pretrained, workdir, "captioner")
  filter_dir = finetune(config.filter, pretrained, workdir, "filter")
  expected = _settings_record(settings, pretrained, captioner, filter_dir)
  bootstrapper = Bootstrapper(settings, captioner, filter_dir, config.sharding,
                              config.captioner.data.cache_dir)
  summary = bootstrap(bootstrapper, out, expected)
  for line in format_summary(summary):
    multihost.say(line)
  return summary


def main(argv: Sequence[str]) -> None:
  from flava_jax import binary  # pylint: disable=import-outside-toplevel
  binary.start(argv)
  flag = flags.FLAGS
  for name in ("pretrained", "workdir", "out"):
    if not getattr(flag, name):
      raise app.UsageError(f"--{name} is required")
  try:
    parse(flag.config)
  except (ValueError, TypeError) as e:
    raise app.UsageError(f"bad config: {e}") from None
  try:
    run(flag.config, flag.pretrained, flag.workdir, flag.out)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
