"""bench_data on the tiny config: its corpus is what it claims and its measurements run."""

import os
import subprocess
import sys

import numpy as np

from configs import flava
from flava_jax.data import sources
from flava_jax.tools import bench_data
from tests.flag_parsing import parse_config_flags
from tests.processes import REPO, child_env


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


def test_write_corpus_leaves_the_binarys_flags_for_its_shards(tmp_path):
  """launch/gpu_figures.sh's loop stage trains the binary with DIR/flags.txt: they must name the
  three shard directories, in the config's mixture weights, as flags the binary's config
  accepts."""
  root = tmp_path / "corpus"
  subprocess.run([sys.executable, "-m", "flava_jax.tools.bench_data",
                  "--config=configs/flava.py:tiny", f"--write_corpus={root}", "--examples=3",
                  "--image_size=48x32"], cwd=REPO, env=child_env(), capture_output=True,
                 text=True, timeout=300, check=True)
  line = (root / bench_data.FLAGS_FILE).read_text()
  corpora = parse_config_flags("flava.py:tiny", *line.split()).data.corpora
  assert set(corpora) == {"paired", "image", "text"}
  mixture = {"paired": 0.7, "image": 0.15, "text": 0.15}  # configs/flava.py's
  for kind, weight in mixture.items():
    assert corpora[kind].source == "array_record" and corpora[kind].weight == weight
    assert corpora[kind].paths == str(root / kind) and os.listdir(corpora[kind].paths)
