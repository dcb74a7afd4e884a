"""bench_data on the tiny config: its corpus is what it claims and its measurements run."""

import numpy as np

from configs import flava
from flava_jax.data import sources
from flava_jax.tools import bench_data


def test_bench_corpus_and_measurement(tmp_path):
  dirs = bench_data.write_corpus(str(tmp_path), examples=6, width=96, height=64)
  paired = sources.open_source(sources.SourceConfig(source="array_record",
                                                    paths=dirs["paired"]), "b")
  assert len(paired) == 6
  example = paired[0]
  assert example["image"][:2] == b"\xff\xd8" and len(example["caption"].split()) >= 8
  config = bench_data._config(flava.get_config("tiny"), dirs, ("paired", "image", "text"),
                              batch=4, workers=0, threads=1, fast_decode=True)
  rate, counts = bench_data.measure(config, batches=10)
  assert rate > 0 and sum(counts.values()) == 10 and set(counts) <= {"paired", "image", "text"}
  assert counts["paired"] >= 3  # weight 0.7 of 10 draws
  image = np.frombuffer(example["image"], np.uint8)
  assert image.size > 500  # a real JPEG, not a placeholder
