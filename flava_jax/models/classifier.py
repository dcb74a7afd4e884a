"""FLAVA with a classification head on one [CLS] state, for fine-tuning.

    inputs="image"       h_CLS_I (final-LN image encoder)          e.g. ImageNet
    inputs="text"        h_CLS_T of one text or a text pair         GLUE
    inputs="image_text"  h_CLS_M of the multimodal encoder          VQAv2, SNLI-VE, Hateful Memes

Parameters: {"backbone": FLAVA's (only the encoders the inputs use), "head": the classifier}, so
a pretrained FLAVA's groups copy in by name. Pixels come normalised (the caller finishes uint8
views: data/transforms.encoder_pixels).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from flava_jax.models.config import FlavaConfig
from flava_jax.models.flava import FlavaModel
from flava_jax.models.heads import MaskedPredictionHead

Array = jax.Array
INPUTS = ("image", "text", "image_text")


class FlavaClassifier(nn.Module):
  config: FlavaConfig
  inputs: str
  num_classes: int
  hidden_size: int  # the head's hidden width (FLAVA: 1536, twice the encoder width)

  def setup(self):
    if self.inputs not in INPUTS:
      raise ValueError(f"inputs={self.inputs!r}: use one of {INPUTS}")
    self.backbone = FlavaModel(self.config.replace(pretraining_heads=False))
    # The masked-prediction heads' shape (dense -> GELU -> LayerNorm -> dense), at its own width.
    self.head = MaskedPredictionHead(self.hidden_size, self.num_classes, 1e-12, self.config)

  def pooled(self, batch: dict[str, Array]) -> Array:
    """The [CLS] state the head reads: [B, D]."""
    if self.inputs == "text":
      return self.backbone.encode_text(batch["input_ids"], batch["attention_mask"],
                                    batch.get("token_type_ids"))[:, 0]
    pixels = batch["pixels"]
    if self.inputs == "image":
      return self.backbone.encode_image(pixels)[:, 0]
    image = self.backbone.image_outputs(pixels)
    text = self.backbone.text_outputs(batch["input_ids"], batch["attention_mask"],
                                   batch.get("token_type_ids"))
    return self.backbone.encode_multimodal(image.hidden_state, text.hidden_state,
                                        batch["attention_mask"])[:, 0]

  def __call__(self, batch: dict[str, Array]) -> Array:
    """[B, num_classes] float32 logits."""
    return self.head(self.pooled(batch))
