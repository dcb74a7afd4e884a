"""One results table from several bench runs' JSON files (`bench --json_out`, the STAGE.json
files of launch/gpu_figures.sh), for docs/results.md:

    python -m flava_jax.tools.bench_table OUT/*.json

The bench times ours and the PyTorch peer's modes in whichever runs asked for them (the GPU
script times torch.compile in one stage and eager, with the largest batches, in another). This
joins them: one row per task, batch kind and batch with ours, the peer's eager and compiled
examples/s, the ratios, our MFU and peak memory, the largest batches found and the date. Where
two runs timed the same thing, the first file given wins.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

OURS, EAGER, COMPILE = "flava_jax", "transformers eager", "transformers compile"
HEADER = ("| device | task, shapes | batch kind | flava_jax examples/s | peer eager | peer "
          "torch.compile | ours / eager | ours / compile | MFU | peak memory | largest batch "
          "(ours / eager) | date |")


def join(results: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
  """{(task, variant, kind, batch): {"device", "date", "lengths", OURS, EAGER, COMPILE,
  "largest", "largest_eager"}} from the runs' results, the first run's figure winning."""
  rows: dict[tuple, dict[str, Any]] = {}

  def row(result: dict[str, Any], kind: str, batch: int) -> dict[str, Any]:
    key = (result.get("task", "flava"), result.get("variant", ""), kind, batch)
    length = None  # the text length, where the kind reads text
    if kind != "image":
      length = (kind == "paired" and result.get("paired_text_length")) or result.get(
          "text_length")
    return rows.setdefault(key, {"device": result.get("device", "?"), "date": result["date"],
                                 "text": length})

  for result in results:
    for timing in result.get("timings", []):
      row(result, timing["kind"], timing["batch"]).setdefault(timing["name"], timing)
    eager = result.get("peer", {}).get("modes", {}).get("eager", {})
    for kind, found in result.get("largest_batch", {}).items():
      entry = row(result, kind, result["batch"])
      entry.setdefault("largest", found.get("batch"))
      theirs = eager.get(kind, {}).get("largest_batch") or {}
      if theirs.get("batch"):
        entry.setdefault("largest_eager", theirs["batch"])
  return rows


def _rate(timing: dict[str, Any] | None) -> str:
  return f"{timing['examples_per_second']:,.0f}" if timing else "-"


def _ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
  if not ours or not theirs:
    return "-"
  return f"{ours['examples_per_second'] / theirs['examples_per_second']:.2f}x"


def markdown(rows: dict[tuple, dict[str, Any]]) -> list[str]:
  lines = [HEADER, "|" + " --- |" * HEADER.count(" | ") + " --- |"]
  for (task, variant, kind, batch), entry in rows.items():
    ours = entry.get(OURS)
    mfu = f"{100 * ours['mfu']:.1f}%" if ours and ours.get("mfu") is not None else "-"
    peak = (f"{ours['peak_bytes'] / 2**30:.1f} GiB" if ours and ours.get("peak_bytes")
            else "-")
    largest = "-"
    if entry.get("largest") or entry.get("largest_eager"):
      largest = f"{entry.get('largest') or '-'} / {entry.get('largest_eager') or '-'}"
    shapes = f"{task} {variant}, batch {batch}" + (f", text {entry['text']}"
                                                   if entry["text"] else "")
    lines.append(f"| {entry['device']} | {shapes} | {kind} | {_rate(ours)} | "
                 f"{_rate(entry.get(EAGER))} | {_rate(entry.get(COMPILE))} | "
                 f"{_ratio(ours, entry.get(EAGER))} | {_ratio(ours, entry.get(COMPILE))} | "
                 f"{mfu} | {peak} | {largest} | {entry['date']} |")
  return lines


def main(argv: Sequence[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  results = []
  for path in argv[1:]:
    try:
      with open(path, encoding="utf-8") as f:
        results.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      print(f"skipped {path}: {e}", file=sys.stderr)
  for line in markdown(join(results)):
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
