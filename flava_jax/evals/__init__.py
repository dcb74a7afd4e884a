"""Evaluators by name, resolved lazily (a config names one with `evaluator`).

Each module holds a `Config` dataclass (features.TaskConfig's fields plus its own) and an
`Evaluator(cfg, ctx, where)` that opens and checks its splits when built (start-up errors name
the config field) and returns metrics when called with parameters: `evaluator(params) -> dict`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from flava_jax.evals.features import EvalContext
from flava_jax.parse import check_choice, dataclass_from_dict

EVALUATORS = {
    "zero_shot": "flava_jax.evals.zero_shot",        # zero-shot image classification
    "retrieval": "flava_jax.evals.retrieval",        # zero-shot image<->text retrieval
    "linear_probe": "flava_jax.evals.linear_probe",  # logistic regression on frozen [CLS]
    "finetune": "flava_jax.evals.finetune",          # a classifier head on h_CLS_I/T/M, trained
    "reconstruction": "flava_jax.evals.reconstruction",  # an image tokenizer's round trip
    "captioning": "flava_jax.evals.captioning",      # captions of held-out images (BLIP)
    "answer_ranking": "flava_jax.evals.answer_ranking",  # VQA by ranking answers (BLIP)
    "audio_retrieval": "flava_jax.evals.audio_retrieval",  # zero-shot audio<->text retrieval
    "omni_retrieval": "flava_jax.evals.omni_retrieval",  # text/image/audio pairs (omni)
    "speech_to_text": "flava_jax.evals.speech_to_text",  # transcriptions' WER (omni)
    "text_to_image": "flava_jax.evals.text_to_image",  # drawn images' codes, pixels (omni)
}


def module(name: str, where: str = "evaluator") -> Any:
  check_choice(where, name, tuple(EVALUATORS))
  return importlib.import_module(EVALUATORS[name])


def parse(values: Mapping[str, Any], where: str) -> Any:
  """The evaluator's Config from a config mapping with an `evaluator` field."""
  values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
  if "evaluator" not in values:
    raise ValueError(f"{where}.evaluator is missing: name one of {sorted(EVALUATORS)}")
  mod = module(values["evaluator"], f"{where}.evaluator")
  return dataclass_from_dict(mod.Config, values, where)


def build(values: Mapping[str, Any], ctx: EvalContext, where: str) -> Any:
  """The evaluator a config mapping names, its splits opened and checked."""
  return build_parsed(parse(values, where), ctx, where)


# The predict functions (tasks' `predict()`) each evaluator calls.
NEEDS = {
    "zero_shot": ("image_features", "text_features"),
    "retrieval": ("image_features", "text_features"),
    "linear_probe": (),  # the features' own call, checked by the evaluator
    "finetune": ("classifier", "classifier_width"),
    "reconstruction": ("reconstruct",),
    "captioning": ("caption", "caption_settings", "caption_prompt"),
    "answer_ranking": ("answer_model",),
    "audio_retrieval": ("audio_features", "text_features"),
    "omni_retrieval": ("unimodal", "match_from_states"),
    "speech_to_text": ("transcribe",),
    "text_to_image": ("generate_codes", "image_codes", "code_pixels"),
}


def build_parsed(cfg: Any, ctx: EvalContext, where: str) -> Any:
  """The evaluator of a parsed Config (parse), its splits opened and checked; a model whose task
  lacks a function the evaluator calls is refused here, naming it."""
  missing = [n for n in NEEDS.get(cfg.evaluator, ()) if not hasattr(ctx.predict, n)]
  if missing:
    raise ValueError(f"{where}.evaluator={cfg.evaluator!r} calls {', '.join(missing)}, which "
                     f"this model's task does not provide")
  return module(cfg.evaluator).Evaluator(cfg, ctx, where)
