"""CapFilt (flava_jax/tools/capfilt.py) on a small BLIP and a few human and web pairs written as our
shards: the fine-tunes start from the pretrained run, every candidate caption gets a decision
that follows the threshold, the output reads back as a paired corpus, the filter's measures
count what they say, and a run killed in the middle and started again writes the same bytes as
an uninterrupted one."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import blip as blip_configs
from flava_jax import trainer, warm_start
from flava_jax.data import records, sources
from flava_jax.tools import capfilt
from tests.multihost.test_multihost import _finish, _launch, _load
from tests.processes import REPO, child_env

HUMAN, WEB, SHARD = 8, 24, 8  # one human shard, then 3 web shards
SMALL = {"model.image.num_layers": 1, "model.text.num_layers": 1, "model.image.image_size": 32,
         "model.image.hidden_size": 32, "model.text.hidden_size": 32, "model.image.mlp_dim": 64,
         "model.text.mlp_dim": 64, "model.embed_dim": 16, "global_batch": 16,
         "loss.queue_size": 16, "checkpoint.async_save": False, "log_every_steps": 2}

CONFIG_FILE = '''
import sys
sys.path.insert(0, {repo!r})
from configs import capfilt

SMALL = {small!r}


def _set(config, dotted, value):
  *path, last = dotted.split(".")
  for part in path:
    config = config[part]
  config[last] = value


def get_config(arg=None):
  config = capfilt.get_config()
  for stage in ("captioner", "filter"):
    for key, value in SMALL.items():
      _set(config[stage], key, value)
    config[stage].total_steps = 4
    config[stage].checkpoint.every_steps = 4
    config[stage].optimizer.warmup_steps = 1
    config[stage].evals = {{}}
    config[stage].data.corpora.human.update(source="array_record", name="", paths={human!r})
  config.human.update(source="array_record", name="", paths={human!r})
  config.web.update(source="array_record", name="", paths={web!r})
  config.shard_size = {shard}
  config.batch_size = 8
  config.max_length = 10
  config.min_length = 5
  return config
'''


BAD = 5  # the web record whose image is not an image: skipped and counted


def _write_part(part, count, folder):
  src = sources.open_source(sources.SourceConfig(name=part, split="train"), "test")
  with records.ShardWriter(os.path.join(folder, "paired")) as writer:
    for i in range(count):
      record = {k: v for k, v in src.record(i).items() if k != "id"}
      if part == "web" and i == BAD:
        record["image"] = b"not an image"
      writer.write(record)
  return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config module path, pretrained workdir, fine-tunes' workdir, uninterrupted run's output
  folder and summary)."""
  root = tmp_path_factory.mktemp("capfilt")
  human = _write_part("human", HUMAN, str(root / "human"))
  web = _write_part("web", WEB, str(root / "web"))
  config_path = str(root / "capfilt_small.py")
  with open(config_path, "w") as f:
    f.write(CONFIG_FILE.format(repo=REPO, small=SMALL, human=human, web=web, shard=SHARD))
  pretrained = blip_configs.get_config("tiny")
  for key, value in SMALL.items():
    *path, last = key.split(".")
    node = pretrained
    for part in path:
      node = node[part]
    node[last] = value
  pretrained.update(total_steps=4, evals={})
  pretrained.checkpoint.every_steps = 4
  pretrained.data.corpora.paired.update(source="array_record", name="", paths=web)
  trainer.train_and_evaluate(pretrained, str(root / "pretrained"))
  config = _load(config_path)
  out = str(root / "out")
  summary = capfilt.run(config, str(root / "pretrained"), str(root / "work"), out)
  return config_path, str(root / "pretrained"), str(root / "work"), out, summary


def _files(folder):
  out = {}
  for base, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(base, name), "rb") as f:
        out[os.path.relpath(os.path.join(base, name), folder)] = f.read()
  return out


def test_fine_tunes_start_from_the_pretrained_run_and_stop_at_their_steps(setup):
  _, pretrained, work, _, _ = setup
  before = warm_start.read_workdir_params(pretrained, "pretrained")
  for stage in capfilt.STAGES:
    path = os.path.join(work, stage)
    assert warm_start.checkpoint_steps(path) == [4]
    with open(os.path.join(path, trainer.METRICS_FILE)) as f:
      assert f.read()
    after = warm_start.read_workdir_params(path, stage)
    # Moved away from, but started at, the pretrained weights: 4 small steps stay close.
    for part in ("vision", "text_encoder"):
      a = np.concatenate([np.ravel(x) for x in _leaves(before[part])])
      b = np.concatenate([np.ravel(x) for x in _leaves(after[part])])
      assert 0 < np.abs(a - b).max() < 0.05, (stage, part)


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


def test_decisions_follow_the_threshold_and_the_output_reads_as_a_paired_corpus(setup):
  _, _, _, out, summary = setup
  decisions = capfilt.read_decisions(out)
  by_origin = {o: [d for d in decisions if d["origin"] == o] for o in capfilt.ORIGINS}
  assert len(by_origin["human"]) == HUMAN and all(d["kept"] for d in by_origin["human"])
  assert len(by_origin["web"]) == WEB
  skipped = [d for d in by_origin["web"] if "reason" in d]
  assert [(d["index"], d["reason"], d["kept"]) for d in skipped] == [(BAD, "undecodable", False)]
  assert summary["web"]["skipped/undecodable"] == 1
  assert len(by_origin["synthetic"]) == WEB - 1  # one synthetic caption per readable web image
  judged = [d for d in by_origin["web"] + by_origin["synthetic"] if "reason" not in d]
  for d in judged:
    assert d["kept"] == (d["match"] >= 0.5), d
    assert 0.0 <= d["match"] <= 1.0
  kept = {o: sum(d["kept"] for d in rows) for o, rows in by_origin.items()}
  for origin in capfilt.ORIGINS:
    assert summary[origin].get("kept", 0) == kept[origin]
    assert summary[origin].get("dropped", 0) == len(by_origin[origin]) - kept[origin] - (
        len(skipped) if origin == "web" else 0)
  assert summary["shards"] == 1 + math.ceil(WEB / SHARD)
  source = sources.open_source(sources.SourceConfig(source="array_record", paths=out),
                               "out", "paired")
  assert len(source) == summary["examples"] == sum(kept.values())
  rows = [source.record(i) for i in range(len(source))]
  assert sorted(r["origin"] for r in rows) == sorted(
      [o for o in capfilt.ORIGINS for _ in range(kept[o])])
  synthetic = [d["caption"] for d in by_origin["synthetic"]]
  assert all(s for s in synthetic) and len(set(synthetic)) > 1
  for r in rows:
    assert r["image"][:2] == b"\xff\xd8" and r["caption"]
    if r["origin"] == "web":  # the recorded corruption travels with the pair
      assert r["noise"] in ("clean", "mismatched", "partly_wrong", "uninformative")
  with open(os.path.join(out, "paired.summary.json")) as f:
    assert json.load(f)["kind"] == "paired"
  measured = summary["web_measured"]
  noisy = [d for d in by_origin["web"] if "reason" not in d and d["noise"] != "clean"]
  assert measured["noisy"] == len(noisy) and measured["captions"] == WEB - 1
  lines = capfilt.format_summary(summary)
  assert lines[0].startswith(f"capfilt: {summary['examples']} pairs in {summary['shards']} shards")


def test_filter_measures_count_precision_and_recall():
  scene = json.dumps({"groups": [dict(count=1, size="small", colour="red", shape="circle")],
                      "where": None})
  decisions = [
      dict(origin="web", kept=False, noise="mismatched", match=0.1, caption="x"),
      dict(origin="web", kept=False, noise="clean", match=0.2, caption="x"),
      dict(origin="web", kept=True, noise="uninformative", match=0.9, caption="x"),
      dict(origin="web", kept=True, noise="clean", match=0.8, caption="x"),
      dict(origin="synthetic", kept=False, caption="a blue square", scene=scene, match=0.1),
      dict(origin="synthetic", kept=True, caption="a small red circle", scene=scene, match=0.9),
      dict(origin="synthetic", kept=False, caption="a red circle", scene=scene, match=0.3),
      dict(origin="human", kept=True, caption="a red circle"),
      dict(origin="web", kept=False, index=9, reason="undecodable"),
  ]
  m = capfilt.filter_measures(decisions)
  assert m["web_measured"] == dict(captions=4, noisy=2, dropped=2, precision=0.5, recall=0.5)
  # "a red circle" is true of the scene (the size left out): one of two drops was right.
  assert m["synthetic_measured"] == dict(captions=3, noisy=1, dropped=2, precision=0.5,
                                         recall=1.0)
  assert m["human"] == {"kept": 1}
  assert m["web"] == {"kept": 2, "dropped": 2, "skipped": 1, "skipped/undecodable": 1}
  assert m["web_by_noise"]["mismatched"] == {"dropped": 1}


def test_killed_in_the_middle_and_restarted_writes_the_same_bytes(setup, tmp_path):
  config_path, pretrained, work, reference, _ = setup
  out = str(tmp_path / "out")
  command = [sys.executable, "-m", "flava_jax.tools.capfilt", f"--config={config_path}",
             f"--pretrained={pretrained}", f"--workdir={work}", f"--out={out}"]
  proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "capfilt: paired-00001-of-00004" in line:  # the first web shard is written
      break
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])
  assert any("the captioner is trained" in l for l in lines), "".join(lines[-20:])
  written = _files(out)
  assert "paired.summary.json" not in written  # stopped before the end
  assert "paired-00003-of-00004.array_record" not in written
  done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "paired-00000-of-00004.array_record is already written" in done.stdout
  assert "paired-00001-of-00004.array_record is already written" in done.stdout
  assert _files(out) == _files(reference)


def test_another_runs_output_folder_is_refused(setup, tmp_path):
  config_path, pretrained, work, out, _ = setup
  config = _load(config_path)
  config.threshold = 0.7
  with pytest.raises(FileExistsError, match=r"holds the output of another CapFilt run \(its "
                                            r"settings differ\)"):
    capfilt.run(config, pretrained, work, out)
  (tmp_path / "stuff.txt").write_text("x")
  with pytest.raises(FileExistsError, match=r"not empty and holds no capfilt\.json"):
    capfilt.run(_load(config_path), pretrained, work, str(tmp_path))
  bad = _load(config_path)
  bad.threshold = 1.5
  with pytest.raises(ValueError, match=r"config\.threshold=1\.5"):
    capfilt.parse(bad)


def test_two_processes_write_what_one_process_writes(setup, tmp_path):
  """CapFilt as a 2-process job (2 x 4 CPU devices, gloo) gives the captions and decisions of the
  1-process run: each image's caption depends on its own key, each pair's match on the pair."""
  config_path, pretrained, work, reference, _ = setup
  out = str(tmp_path / "out")
  log = _finish(_launch(2, ["flava_jax.tools.capfilt", f"--config={config_path}",
                            f"--pretrained={pretrained}", f"--workdir={work}", f"--out={out}"]))
  assert "process 0 of 2" in log or "process 1 of 2" in log, log[-2000:]
  ours, theirs = capfilt.read_decisions(out), capfilt.read_decisions(reference)
  assert len(ours) == len(theirs) == HUMAN + 2 * WEB - 1
  for a, b in zip(ours, theirs):
    assert (a["index"], a["origin"], a.get("caption")) == (b["index"], b["origin"],
                                                          b.get("caption"))
    if a["origin"] != "human" and "reason" not in a:
      assert a["match"] == pytest.approx(b["match"], abs=1e-5)
      if abs(b["match"] - 0.5) > 1e-5:
        assert a["kept"] == b["kept"]
  with open(os.path.join(out, "paired.summary.json")) as f:
    assert json.load(f)["examples"] == sum(d["kept"] for d in ours)
