"""BLIP's PyTorch peer for the bench: the reference's pretraining step on transformers' modules.

The Salesforce code (models/blip_pretrain.py) needs timm, fairscale, a downloaded tokenizer and
downloaded ImageNet ViT weights; transformers has its modules under other names: BlipVisionModel
(the ViT), BlipTextModel (the MED text encoder, with cross-attention in every layer),
BlipTextLMHeadModel (the decoder) and the projections and ITM head of BlipForImageTextRetrieval.
`BlipPretrain` assembles them into the reference's step, in its order:
  1. image tokens and normalised [CLS] features; unimodal text features;
  2. under no_grad: the momentum encoders move towards the online ones (rate loss.momentum) and
     give features; ITC against them and the queues, soft targets weighted by alpha;
  3. ITM on the positive pairs and one hard negative image per text and one negative text per
     image, drawn from the similarities' softmax (one draw per row, vectorised: the reference
     draws row by row in a Python loop);
  4. the decoder's LM loss ([DEC] first, padding ignored, label smoothing), which shares every
     parameter but its self-attention with the encoder when model.share_decoder is set;
then the batch's momentum features replace the queues' oldest columns. torch.compile compiles the
forward; the momentum update and the enqueue stay outside it (in-place buffer writes).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from flava_jax.data import transforms
from flava_jax.tools.peer import TorchStep


def inputs(request: dict[str, Any], batch: int, seed: int, device: Any) -> dict[str, Any]:
  """The bench's random BLIP batch (tasks/blip.py random_pairs) as torch tensors: normalised NCHW
  pixels, int64 ids and mask."""
  import torch  # pylint: disable=import-outside-toplevel
  from flava_jax.models.blip import BlipConfig  # pylint: disable=import-outside-toplevel
  from flava_jax.tasks.blip import random_pairs  # pylint: disable=import-outside-toplevel
  ours = random_pairs(BlipConfig.from_dict(request["model"]), request["text_length"], batch,
                      seed)
  arrays = {"pixel_values": np.ascontiguousarray(
                transforms.encoder_pixels(ours["pixels"]).transpose(0, 3, 1, 2)),
            "input_ids": ours["input_ids"].astype(np.int64),
            "attention_mask": ours["attention_mask"].astype(np.int64)}
  return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def build(request: dict[str, Any]) -> Any:
  """The BlipPretrain module of the request's model and loss settings (on the CPU)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel
  from transformers import (  # pylint: disable=import-outside-toplevel
      BlipForImageTextRetrieval, BlipTextLMHeadModel)
  from flava_jax import convert_blip  # pylint: disable=import-outside-toplevel
  from flava_jax.models.blip import BlipConfig  # pylint: disable=import-outside-toplevel

  ours = BlipConfig.from_dict(request["model"])
  loss = request["loss"]
  hf = convert_blip.config_to_transformers(ours, "BlipForImageTextRetrieval")
  hf.text_config.label_smoothing = loss["label_smoothing"]
  text_ids = ours.text

  class BlipPretrain(nn.Module):
    """The reference's pretraining step (ITC with momentum and queues, ITM, LM)."""

    def __init__(self):
      super().__init__()
      retrieval = BlipForImageTextRetrieval(hf)
      self.vision = retrieval.vision_model
      self.text_encoder = retrieval.text_encoder
      self.vision_proj, self.text_proj = retrieval.vision_proj, retrieval.text_proj
      self.itm_head = retrieval.itm_head
      self.text_decoder = BlipTextLMHeadModel(hf.text_config)
      if ours.share_decoder:  # every parameter but the decoder's self-attention
        encoder, decoder = self.text_encoder, self.text_decoder.bert
        decoder.embeddings = encoder.embeddings
        for mine, theirs in zip(decoder.encoder.layer, encoder.encoder.layer):
          mine.crossattention, mine.intermediate = theirs.crossattention, theirs.intermediate
          mine.output = theirs.output
      if ours.tie_word_embeddings:
        self.text_decoder.cls.predictions.decoder.weight = (
            self.text_decoder.bert.embeddings.word_embeddings.weight)
      self.temp = nn.Parameter(torch.tensor(ours.temp_init))
      self.online = [self.vision, self.vision_proj, self.text_encoder, self.text_proj]
      self.momentum = nn.ModuleList(copy.deepcopy(m) for m in self.online)
      for p in self.momentum.parameters():
        p.requires_grad_(False)
      size = loss["queue_size"]
      self.register_buffer("image_queue", F.normalize(torch.randn(ours.embed_dim, size), dim=0))
      self.register_buffer("text_queue", F.normalize(torch.randn(ours.embed_dim, size), dim=0))
      self.queue_ptr = 0

    @torch.no_grad()
    def momentum_update(self) -> None:
      rate, momentum = loss["momentum"], list(self.momentum.parameters())
      online = [p for m in self.online for p in m.parameters()]
      torch._foreach_mul_(momentum, rate)  # pylint: disable=protected-access
      torch._foreach_add_(momentum, online, alpha=1 - rate)  # pylint: disable=protected-access
      self.temp.clamp_(0.001, 0.5)

    @torch.no_grad()
    def enqueue(self, image_feat: Any, text_feat: Any) -> None:
      rows, start = image_feat.shape[0], self.queue_ptr
      self.image_queue[:, start:start + rows] = image_feat.T
      self.text_queue[:, start:start + rows] = text_feat.T
      self.queue_ptr = (start + rows) % loss["queue_size"]

    def forward(self, pixel_values, input_ids, attention_mask):
      rows = input_ids.shape[0]
      image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
      image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long,
                              device=image_embeds.device)
      image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
      text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
      text_feat = F.normalize(self.text_proj(text.last_hidden_state[:, 0]), dim=-1)
      vision_m, vision_proj_m, text_encoder_m, text_proj_m = self.momentum
      with torch.no_grad():
        embeds_m = vision_m(pixel_values=pixel_values).last_hidden_state
        image_feat_m = F.normalize(vision_proj_m(embeds_m[:, 0]), dim=-1)
        text_m = text_encoder_m(input_ids=input_ids, attention_mask=attention_mask)
        text_feat_m = F.normalize(text_proj_m(text_m.last_hidden_state[:, 0]), dim=-1)
        image_all = torch.cat([image_feat_m.T, self.image_queue], dim=1)
        text_all = torch.cat([text_feat_m.T, self.text_queue], dim=1)
        targets = torch.zeros(rows, image_all.shape[1], device=image_all.device)
        targets[:, :rows] = torch.eye(rows, device=image_all.device)
        alpha = loss["alpha"]
        i2t_targets = alpha * F.softmax(image_feat_m @ text_all / self.temp, 1) + (
            1 - alpha) * targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_all / self.temp, 1) + (
            1 - alpha) * targets
      sim_i2t = image_feat @ text_all / self.temp
      sim_t2i = text_feat @ image_all / self.temp
      itc = (-(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
             - (F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()) / 2

      enc_ids = input_ids.clone()
      enc_ids[:, 0] = text_ids.enc_token_id
      positive = self.text_encoder(input_ids=enc_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts).last_hidden_state
      with torch.no_grad():
        eye = torch.eye(rows, dtype=torch.bool, device=sim_t2i.device)
        weights_t2i = (F.softmax(sim_t2i[:, :rows].float(), 1) + 1e-4).masked_fill(eye, 0)
        weights_i2t = (F.softmax(sim_i2t[:, :rows].float(), 1) + 1e-4).masked_fill(eye, 0)
        negative_image = torch.multinomial(weights_t2i, 1).squeeze(1)
        negative_text = torch.multinomial(weights_i2t, 1).squeeze(1)
      ids_all = torch.cat([enc_ids, enc_ids[negative_text]])
      mask_all = torch.cat([attention_mask, attention_mask[negative_text]])
      embeds_all = torch.cat([image_embeds[negative_image], image_embeds])
      negative = self.text_encoder(input_ids=ids_all, attention_mask=mask_all,
                                   encoder_hidden_states=embeds_all,
                                   encoder_attention_mask=torch.cat([image_atts, image_atts])
                                   ).last_hidden_state
      logits = self.itm_head(torch.cat([positive[:, 0], negative[:, 0]]))
      labels = torch.cat([torch.ones(rows, dtype=torch.long),
                          torch.zeros(2 * rows, dtype=torch.long)]).to(logits.device)
      itm = F.cross_entropy(logits, labels)

      dec_ids = input_ids.clone()
      dec_ids[:, 0] = text_ids.bos_token_id
      lm_targets = dec_ids.masked_fill(dec_ids == text_ids.pad_token_id, -100)
      lm = self.text_decoder(input_ids=dec_ids, attention_mask=attention_mask,
                             encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_atts, labels=lm_targets).loss
      total = loss["itc"] * itc + loss["itm"] * itm + loss["lm"] * lm
      parts = {"itc": itc.detach(), "itm": itm.detach(), "lm": lm.detach()}
      return total, parts, image_feat_m, text_feat_m

  torch.manual_seed(0)
  return BlipPretrain()


class BlipPeerStep(TorchStep):
  """One BLIP pretraining step in PyTorch: momentum update, forward with the three losses,
  backward, AdamW (weight decay 0.05 on every parameter, as the reference), enqueue."""

  MODEL = "the reference BLIP pretraining step on transformers' BLIP modules"

  def __init__(self, request: dict[str, Any], device: Any, autocast: bool, compiled: bool):
    super().__init__(request, build(request), device, autocast, compiled, weight_decay=0.05)

  def inputs(self, kind: str, batch: int, seed: int) -> dict[str, Any]:
    del kind  # paired only
    return inputs(self.request, batch, seed, self.device)

  def __call__(self, batch: dict[str, Any]) -> None:
    self.model.momentum_update()
    with self.autocast_context():
      loss, _, image_feat_m, text_feat_m = self.forward(**batch)
    self.update(loss)
    self.model.enqueue(image_feat_m.float(), text_feat_m.float())
