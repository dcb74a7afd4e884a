"""The workdir's lock, resume rules and config history; the step clock, per-corpus means and the
metric writer; where a divergence began. No training here: these are the pieces, on their own."""

import json
import os
import subprocess
import sys

import pytest

from flava_jax import progress, trainer
from flava_jax import workdir as workdir_lib


def test_the_lock_refuses_a_second_holder_and_a_dead_holder_leaves_none(tmp_path):
  lock = workdir_lib.Lock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()} on .* since"):
    workdir_lib.Lock(str(tmp_path)).acquire()
  lock.release()
  workdir_lib.Lock(str(tmp_path)).acquire().release()
  # A holder killed outright (SIGKILL) leaves no stuck lock.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from flava_jax import workdir as w; "
       f"lock = w.Lock({str(tmp_path)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):
    workdir_lib.Lock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  workdir_lib.Lock(str(tmp_path)).acquire().release()


def test_a_workdir_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    workdir_lib.prepare(str(path))
  with pytest.raises(workdir_lib.WorkdirError, match="cannot be created"):
    workdir_lib.prepare(str(path / "below"))


def test_resume_rules_name_every_refused_field_and_say_what_accepted_ones_do():
  before = {"total_steps": 40, "global_batch": 32, "seed": 0,
            "model": {"image": {"hidden_size": 64}, "dtype": "float32"},
            "data": {"worker_count": 0, "corpora": {"paired": {"weight": 0.7, "kind": "paired"}}},
            "evals": {}, "checkpoint": {"every_steps": 20}}
  after = json.loads(json.dumps(before))
  after.update(total_steps=60, global_batch=16)
  after["data"]["corpora"]["paired"]["weight"] = 0.5
  after["model"]["dtype"] = "bfloat16"
  after["evals"] = {"retrieval": {"every_steps": 10}}
  notes = workdir_lib.check_resume(before, after, 40, "/w")
  assert [n.split(" ", 1)[0] for n in notes] == [
      "data.corpora.paired.weight", "evals.retrieval.every_steps", "global_batch", "model.dtype",
      "total_steps"]
  assert all(": " in n for n in notes)  # each says what it does
  after["model"]["image"]["hidden_size"] = 32
  after["data"]["worker_count"] = 2
  after["data"]["corpora"]["web"] = {"weight": 0.1, "kind": "paired"}
  with pytest.raises(workdir_lib.ResumeRefused) as refused:
    workdir_lib.check_resume(before, after, 40, "/w")
  message = str(refused.value)
  assert "\n" not in message
  for field in ("model.image.hidden_size 64 -> 32", "data.worker_count 0 -> 2",
                "data.corpora.web.kind (absent) -> \"paired\""):
    assert field in message
  assert "total_steps" not in message  # accepted changes are not blamed
  # A field the older code did not write (not a corpus): said, not refused.
  newer = json.loads(json.dumps(before))
  newer["model"]["new_option"] = True
  assert workdir_lib.check_resume(before, newer, 40, "/w") == [
      "model.new_option (absent) -> true: a field the checkpoint's config did not have (the "
      "code changed since)"]


def test_each_start_keeps_its_config(tmp_path):
  (tmp_path / workdir_lib.RUN_CONFIG).write_text(json.dumps({"total_steps": 10}))  # older layout
  workdir_lib.record_start(str(tmp_path), {"total_steps": 20}, 10)
  workdir_lib.record_start(str(tmp_path), {"total_steps": 30}, 20)
  history = tmp_path / workdir_lib.HISTORY_DIR
  assert sorted(os.listdir(history)) == ["start-0000-earlier.json", "start-0001-step-10.json",
                                         "start-0002-step-20.json"]
  assert json.loads((history / "start-0000-earlier.json").read_text()) == {"total_steps": 10}
  assert json.loads((tmp_path / workdir_lib.RUN_CONFIG).read_text()) == {"total_steps": 30}


def test_the_step_clock_leaves_out_compiles_saves_and_evaluations():
  now = [0.0]
  clock = progress.StepClock(clock=lambda: now[0])
  clock.begin(1)
  now[0] = 1.0
  clock.compiled(30.0)  # the first call compiles...
  now[0] = 31.5         # ...and the step's results arrive
  assert clock.ready(1) == pytest.approx(1.5)
  with clock.paused("save"):
    now[0] = 40.0       # a checkpoint save between steps
  clock.begin(2)
  now[0] = 40.2
  assert clock.ready(2) == pytest.approx(0.2)
  clock.begin(3)        # the host ran ahead: step 3 began before step 2's results arrived
  now[0] = 40.5
  assert clock.ready(3) == pytest.approx(0.3)
  assert clock.pauses["save"] == [pytest.approx(8.5)]
  assert clock.eta(10) == "3s"  # the median step, 0.3 s, x 10
  assert clock.eta(10, saves_left=2) == "20s"  # + 2 saves of 8.5 s
  assert clock.eta(10, evals_left=1) == "3s + evaluation"  # none timed yet


def test_corpus_means_average_every_step_since_the_last_take():
  means = progress.CorpusMeans()
  for loss in (1.0, 2.0, 3.0):
    means.add("paired", {"loss": loss})
  means.add("text", {"loss": 7.0})
  assert means.take() == {"paired/loss": 2.0, "paired/steps": 3, "text/loss": 7.0,
                          "text/steps": 1}
  assert means.take() == {}


def test_skip_rates_are_per_interval_and_a_high_one_is_warned_about_with_its_reasons():
  skips = progress.SkipRates(["paired", "image"], rows_per_batch=16)
  rates, warnings = skips.take({"paired/missing_text": 4}, {"paired": 2})
  assert rates == {"paired": 4 / 36} and warnings[0].startswith(
      "corpus paired skipped 11% of its examples since the last log line (missing_text 4)")
  rates, warnings = skips.take({"paired/missing_text": 4, "image/missing_image": 16},
                               {"paired": 3, "image": 1})
  assert rates == {"paired": 0.0, "image": 0.5} and len(warnings) == 1
  assert "image skipped 50%" in warnings[0] and "check data.corpora.image" in warnings[0]


def test_the_writer_starts_a_new_file_when_metrics_jsonl_vanishes(tmp_path, capsys):
  writer = progress.MetricWriter(str(tmp_path), 10, tensorboard=False)
  writer.write(1, {"a/loss": 1.0}, eta="?")
  os.remove(tmp_path / progress.METRICS_FILE)
  writer.write(2, {"a/loss": 2.0})
  writer.close()
  rows = progress.logged_steps(str(tmp_path))
  assert [r["step"] for r in rows] == [2]
  out = capsys.readouterr().out
  assert "was deleted or moved during the run; rows from step 2 on go to a new file" in out
  assert "step 1/10 a/loss=1 eta ?" in out
  with pytest.raises(ValueError, match="i2t_r@1"):
    progress.check_name("eval/retrieval/i2t_r@1")


def test_divergence_onset_is_where_losses_left_their_level():
  losses = [(1, "paired", 16.0), (2, "text", 7.0), (3, "paired", 15.0), (4, "text", 6.9),
            (5, "paired", 14.0), (6, "paired", 9e12), (7, "text", 1e15)]
  assert trainer.divergence_onset(losses, 7) == 6
  assert trainer.divergence_onset(losses, 5) == 6  # nothing unusual up to step 5
  assert trainer.divergence_onset(losses[:3], 3) == 4
