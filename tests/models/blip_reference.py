"""Randomly initialised transformers BLIP models for the converter, parity and generation tests.

The retrieval and captioning models share their vision weights (as one flava_jax BLIP needs);
`share_decoder_weights_` also copies the text encoder's non-self-attention weights into the
decoder (the layout a shared-decoder model converts to).
"""

from __future__ import annotations

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from flava_jax.tools.parity import randomize_weights_

# [DEC] = 60, [ENC] = 61 (bos + 1), [SEP] = 3, [PAD] = 0. The vision width (48) differs from the
# text width (32), so a key/value projection from the wrong side would not fit.
TINY = dict(
    vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-6),
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=40, bos_token_id=60,
                     sep_token_id=3, eos_token_id=3, pad_token_id=0),
    image_text_hidden_size=16)
# ViT-B/16 at 224 px and BERT-base (12 heads, as the released checkpoints have).
BASE = dict(vision_config=dict(image_size=224, layer_norm_eps=1e-6),
            text_config=dict(num_attention_heads=12, eos_token_id=102))


def config(sizes=None) -> BlipConfig:
  return BlipConfig(**(sizes or TINY))


def models(sizes=None, seed: int = 0, share_decoder: bool = False
           ) -> tuple[BlipForImageTextRetrieval, BlipForConditionalGeneration]:
  """(retrieval, captioning), random weights everywhere, the same vision transformer."""
  torch.manual_seed(seed)
  hf_config = config(sizes)
  retrieval = randomize_weights_(BlipForImageTextRetrieval(hf_config).eval(), seed)
  captioning = BlipForConditionalGeneration(hf_config).eval()
  randomize_weights_(captioning.text_decoder, seed + 1)
  captioning.vision_model.load_state_dict(retrieval.vision_model.state_dict())
  if share_decoder:
    share_decoder_weights_(retrieval, captioning)
  return retrieval, captioning


def share_decoder_weights_(retrieval, captioning) -> None:
  """Copies every text-encoder weight but the self-attention sublayers into the decoder."""
  encoder = retrieval.text_encoder.state_dict()
  decoder = captioning.text_decoder.bert
  with torch.no_grad():
    for name, value in decoder.state_dict().items():
      if ".attention." not in name and name in encoder:
        value.copy_(encoder[name])
