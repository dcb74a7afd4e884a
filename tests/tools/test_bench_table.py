"""bench_table joins the bench's JSON files: ours from one run, the peer's modes from others."""

import json

from flava_jax.tools import bench_table


def _timing(name, kind, batch, seconds, **more):
  return dict(name=name, kind=kind, batch=batch, step_seconds=seconds,
              examples_per_second=batch / seconds, **more)


def _run(**fields):
  return dict(date="2026-12-04", device="NVIDIA H200", task="flava", variant="full",
              paired_text_length=77, text_length=512, **fields)


def test_runs_join_into_one_row_per_kind_with_the_ratios(tmp_path, capsys):
  compiled = _run(batch=128, timings=[
      _timing("flava_jax", "paired", 128, 0.1, mfu=0.41, peak_bytes=30 * 2**30),
      _timing("transformers compile", "paired", 128, 0.25)])
  eager = _run(batch=128, timings=[
      _timing("flava_jax", "paired", 128, 0.2),  # the first file's figure wins
      _timing("transformers eager", "paired", 128, 0.4),
      _timing("flava_jax", "image", 128, 0.05)],
      peer={"modes": {"eager": {"paired": {"largest_batch": {"batch": 176}}}}},
      largest_batch={"paired": {"batch": 480}})
  rows = bench_table.join([compiled, eager])
  paired = rows[("flava", "full", "paired", 128)]
  assert paired["flava_jax"]["step_seconds"] == 0.1 and paired["largest"] == 480
  assert paired["largest_eager"] == 176
  lines = bench_table.markdown(rows)
  assert len(lines) == 4 and all(line.count("|") == 13 for line in lines)
  assert lines[2] == ("| NVIDIA H200 | flava full, batch 128, text 77 | paired | 1,280 | 320 | "
                      "512 | 4.00x | 2.50x | 41.0% | 30.0 GiB | 480 / 176 | 2026-12-04 |")
  assert lines[3].startswith("| NVIDIA H200 | flava full, batch 128 | image | 2,560 | - | - |")

  paths = []
  for i, result in enumerate((compiled, eager)):
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(result))
  (tmp_path / "cut.json").write_text('{"date": ')  # a run cut off mid-write: skipped, named
  assert bench_table.main(["bench_table", *map(str, paths), str(tmp_path / "cut.json")]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines() == lines and "skipped" in err and "cut.json" in err
