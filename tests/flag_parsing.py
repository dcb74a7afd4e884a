"""Configs as the binaries get them: config_flags with a locked config and --config.X=Y."""

import os

from absl import flags
from ml_collections import config_flags

from tests.processes import REPO


def parse_config_flags(config: str, *overrides: str):
  """`config`: a path under configs/ with an optional :VARIANT, e.g. "eval/retrieval.py"."""
  argv = ["binary", f"--config={os.path.join(REPO, 'configs', config)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config
