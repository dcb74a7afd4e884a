"""The FLAVA-full parameter shardings on a (data=2, fsdp=2, tensor=2) mesh are pinned.

A change here changes checkpoint layouts and per-chip memory: review the diff, then regenerate
with UPDATE_GOLDEN=1 python -m pytest tests/test_golden_shardings.py.
"""

import json
import os

from configs import flava as flava_configs

from flava_jax import experiment, sharding

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "full_param_shardings_2x2x2.json")


def test_full_parameter_shardings_match_golden():
  config = flava_configs.get_config("full")
  config.sharding.mesh = dict(data=2, fsdp=2, tensor=2)
  config.global_batch = 8
  described = sharding.describe(experiment.Experiment(config).param_shardings())
  if os.environ.get("UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(described, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert described.keys() == golden.keys(), set(described) ^ set(golden)
  changed = {k: (golden[k], v) for k, v in described.items() if golden[k] != v}
  assert not changed, changed
  # The layout the golden file encodes: FSDP on embed, tensor parallel on heads/mlp/vocab.
  qkv = "['image_encoder']['encoder']['layers']['attention']['qkv_kernel']"
  assert described[qkv] == "(None, 'fsdp', None, 'tensor', None)"
  assert described["['mlm_head']['decoder']['kernel']"] == "('fsdp', 'tensor')"
