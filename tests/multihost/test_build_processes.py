"""The shard builder as a 2-process job (flava_jax.launch): each process writes its own shards,
process 0 counts and installs them; the shards and the summary are those of a 1-process build,
bad examples included."""

import json
import os
import subprocess
import sys

from flava_jax.data import build as B
from tests.data.test_build import _image, _put, _records
from tests.processes import REPO


def _captions(tmp_path):
  """12 captioned images, 3 of them unusable (a missing file, an empty caption, not an image)."""
  rows = []
  for i in range(12):
    name = f"images/{i}.jpg"
    if i == 3:
      name = "images/missing.jpg"
    elif i == 7:
      _put(tmp_path / "data" / name, "not an image")
    else:
      _put(tmp_path / "data" / name, _image(i))
    rows.append({"image": name, "caption": "" if i == 10 else f"picture number {i}"})
  path = tmp_path / "data" / "captions.jsonl"
  _put(path, "".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_two_processes_write_the_shards_of_one(tmp_path):
  captions = _captions(tmp_path)
  one = B.build("paired", captions, str(tmp_path / "one"), num_shards=4)
  assert one.written == 9 and sum(one.skipped.values()) == 3
  done = subprocess.run(
      [sys.executable, "-m", "flava_jax.launch", "--processes=2", "--cpu_devices=1", "--",
       sys.executable, "-m", "flava_jax.data.build", "--kind=paired", f"--input={captions}",
       f"--out={tmp_path / 'two'}", "--num_shards=4"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "wrote 9 paired examples to 4 shards" in done.stdout
  assert "wrote" not in done.stderr  # process 1 reports nothing
  two_dir = tmp_path / "two"
  for path in one.paths:
    theirs = two_dir / os.path.basename(path)
    assert _records([str(theirs)]) == _records([path])
  summary = json.loads((two_dir / "paired.summary.json").read_text())
  mine = json.loads((tmp_path / "one" / "paired.summary.json").read_text())
  for key in ("written", "skipped", "shards"):
    assert summary[key] == mine[key], key
  assert {r: sorted(v) for r, v in summary["skip_examples"].items()} == {
      r: sorted(v) for r, v in mine["skip_examples"].items()}
  assert sorted(os.listdir(two_dir)) == sorted(os.listdir(tmp_path / "one"))  # no leftovers
