"""Our BLIP computes what transformers' BLIP computes, on converted weights (float32).

Both transformers models (BlipForImageTextRetrieval, BlipForConditionalGeneration) are random
and built here; one flava_jax model is converted from the two. Compared: the image tokens, the
unimodal text encoder, the image-grounded [ENC] encoder, the ITM logits, the normalised
contrastive features and their similarities, and the decoder's logits, on right-padded text.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flava_jax import convert_blip
from flava_jax.models.blip import with_first_token
from tests.models import blip_reference


def _inputs(hf_config, batch, length, seed=0):
  rng = np.random.default_rng(seed)
  vision, text = hf_config.vision_config, hf_config.text_config
  pixels = rng.normal(size=(batch, 3, vision.image_size, vision.image_size)).astype(np.float32)
  ids = rng.integers(4, text.bos_token_id, size=(batch, length))  # no special token by chance
  ids[:, 0] = 101 if text.vocab_size > 101 else 1  # [CLS]
  mask = np.ones((batch, length), np.int64)
  mask[-1, length // 2:] = 0  # the last row right-padded
  return pixels, ids * mask, mask


def _check(retrieval, captioning, model, params, batch, length, tol,
           whole_models=True):
  hf_config = retrieval.config
  pixels, ids, mask = _inputs(hf_config, batch, length)
  text = hf_config.text_config
  enc_ids = np.asarray(with_first_token(jnp.asarray(ids), model.config.text.enc_token_id))
  dec_ids = np.asarray(with_first_token(jnp.asarray(ids), model.config.text.bos_token_id))
  assert model.config.text.enc_token_id == text.bos_token_id + 1

  t = {k: torch.tensor(v) for k, v in dict(pixels=pixels, ids=ids, mask=mask, enc=enc_ids,
                                            dec=dec_ids).items()}
  normalize = functools.partial(torch.nn.functional.normalize, dim=-1)
  with torch.no_grad():
    image = retrieval.vision_model(t["pixels"]).last_hidden_state
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    unimodal = retrieval.text_encoder(t["ids"], attention_mask=t["mask"]).last_hidden_state
    grounded = retrieval.text_encoder(t["enc"], attention_mask=t["mask"],
                                      encoder_hidden_states=image,
                                      encoder_attention_mask=image_mask).last_hidden_state
    image_feature = normalize(retrieval.vision_proj(image[:, 0]))
    text_feature = normalize(retrieval.text_proj(unimodal[:, 0]))
    if whole_models:  # the models' own forwards (each runs the vision transformer again)
      itm = retrieval(t["enc"], t["pixels"], attention_mask=t["mask"]).itm_score
      similarity = retrieval(t["ids"], t["pixels"], attention_mask=t["mask"],
                             use_itm_head=False).itm_score
      decoder = captioning(t["pixels"], input_ids=t["dec"], attention_mask=t["mask"]).logits
    else:  # what those forwards compute, from the image tokens above
      itm = retrieval.itm_head(grounded[:, 0])
      similarity = image_feature @ text_feature.T
      decoder = captioning.text_decoder(t["dec"], attention_mask=t["mask"],
                                        encoder_hidden_states=image,
                                        encoder_attention_mask=image_mask).logits
  reference = dict(image=image, unimodal=unimodal, grounded=grounded, itm=itm,
                   image_feature=image_feature, text_feature=text_feature,
                   similarity=similarity, decoder=decoder)

  @jax.jit
  def ours(params, pixels, ids, enc_ids, dec_ids, mask):
    image = model.image_embeds(params, pixels)
    unimodal = model.text_hidden(params, ids, mask)
    grounded = model.text_hidden(params, enc_ids, mask, image)
    image_feature = model.image_feature(params, image)
    text_feature = model.text_feature(params, unimodal)
    return dict(image=image, unimodal=unimodal, grounded=grounded,
                itm=model.itm_logits(params, grounded), image_feature=image_feature,
                text_feature=text_feature, similarity=image_feature @ text_feature.T,
                decoder=model.decoder_logits(params, dec_ids, mask, image))

  got = ours(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
             *(jnp.asarray(x, jnp.int32) for x in (ids, enc_ids, dec_ids, mask)))
  errors = {name: float(np.max(np.abs(np.asarray(got[name]) - reference[name].numpy())))
            for name in reference}
  assert {name: np.shape(got[name]) for name in reference} == {
      name: tuple(value.shape) for name, value in reference.items()}
  worst = {name: err for name, err in errors.items() if not err <= tol}
  assert not worst, f"above {tol}: {worst} (all: {errors})"
  # The comparison is not vacuous: outputs vary across rows and are not tiny.
  assert float(np.std(reference["decoder"].numpy())) > 0.1
  assert float(np.std(reference["itm"].numpy())) > 0.01


@pytest.fixture(scope="module")
def tiny():
  return blip_reference.models()


def test_tiny_parity(tiny):
  retrieval, captioning = tiny
  model, params = convert_blip.from_transformers(retrieval, captioning)
  assert not model.config.share_decoder  # independently drawn decoder
  _check(retrieval, captioning, model, params, batch=3, length=9, tol=1e-5)


def test_tiny_parity_shared_decoder():
  """A captioning decoder equal to the encoder outside self-attention converts to a shared
  decoder (the pretraining layout), which computes the same logits."""
  retrieval, captioning = blip_reference.models(seed=3, share_decoder=True)
  model, params = convert_blip.from_transformers(retrieval, captioning)
  assert model.config.share_decoder
  assert set(params["text_decoder"]["encoder"]["layers"]) == {"attention", "norm_attn"}
  _check(retrieval, captioning, model, params, batch=2, length=7, tol=1e-5)


def test_base_parity():
  """ViT-B/16 at 224 px and BERT-base sizes, one small batch."""
  retrieval, captioning = blip_reference.models(blip_reference.BASE, seed=5)
  model, params = convert_blip.from_transformers(retrieval, captioning)
  cfg = model.config
  assert (cfg.image.hidden_size, cfg.image.num_layers, cfg.image.num_patches, cfg.text.num_layers,
          cfg.text.num_heads, cfg.text.vocab_size, cfg.embed_dim) == (768, 12, 196, 12, 12,
                                                                      30524, 256)
  _check(retrieval, captioning, model, params, batch=2, length=8, tol=1e-4,
         whole_models=False)
