"""BLIP's training data: caption cleaning, RandAugment and the image-caption processor."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageOps

from flava_jax.data import embedded
from flava_jax.data import transforms as T
from flava_jax.data import randaugment as ra
from flava_jax.data.captions import clean_caption
from flava_jax.data.examples import SKIP_REASONS
from flava_jax.data.preprocess import ImageTextProcessor
from flava_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer

# --- captions -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, cleaned", [
    ("A Dog On The GRASS", "a dog on the grass"),
    # each replaced character, alone between two words
    ("a.b!c\"d(e)f*g#h:i;j~k", "a b c d e f g h i j k"),
    # kept punctuation (not in the reference's list)
    ("it's a dog, running-fast? yes/no", "it's a dog, running-fast? yes/no"),
    ("a   dog \t\n barks", "a dog barks"),  # runs of white space collapse to one space
    ("a\tdog", "a\tdog"),  # a single non-space white-space character stays (as in the reference)
    ("  A dog.\n", "a dog"),  # the full stop becomes a space, then the ends are stripped
    ("(Two) cats!!", "two cats"),
    ("...", ""),
])
def test_clean_caption_rules(raw, cleaned):
  assert clean_caption(raw) == cleaned


def test_clean_caption_cuts_to_max_words():
  words = [f"w{i}" for i in range(40)]
  assert clean_caption(" ".join(words)) == " ".join(words[:30])
  assert clean_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"
  assert clean_caption(" ".join(words), max_words=0) == " ".join(words)
  assert clean_caption(" ".join(words[:30])) == " ".join(words[:30])
  # words are counted after cleaning: "a.b" is two words
  assert clean_caption("a.b c d", max_words=2) == "a b"


# --- RandAugment ops ------------------------------------------------------------------------


def _noise(h=32, w=40, low=30, high=200, seed=0):
  return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


def _dot(x, y, size=32, value=255):
  image = np.zeros((size, size, 3), np.uint8)
  image[y, x] = value
  return image


def _bright(image):
  """(row, col) of the pixels above 200 in channel 0."""
  return [tuple(p) for p in np.argwhere(image[..., 0] > 200)]


def test_identity_leaves_the_image_unchanged():
  image = _noise()
  assert np.array_equal(ra.apply_op("Identity", image, 5, np.random.default_rng(0)), image)


def test_magnitude_mapping_and_signs():
  signs = {name: set() for name in ("ShearX", "TranslateY", "Rotate")}
  for seed in range(40):
    rng = np.random.default_rng(seed)
    for name in signs:
      signs[name].add(ra.op_argument(name, 5, rng)[0])
  assert signs["ShearX"] == {0.15, -0.15}
  assert signs["TranslateY"] == {5.0, -5.0}
  assert signs["Rotate"] == {15.0, -15.0}
  rng = np.random.default_rng(0)
  assert ra.op_argument("Brightness", 5, rng) == (1.0,)  # BLIP's M=5: a no-op
  assert ra.op_argument("Sharpness", 8, rng) == pytest.approx((1.54,))
  assert ra.op_argument("Brightness", 0, rng) == pytest.approx((0.1,))
  assert ra.op_argument("TranslateX", 10, rng)[0] in (10.0, -10.0)
  assert ra.op_argument("Equalize", 5, rng) == ()
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    ra.op_argument("Solarise", 5, rng)


def test_brightness_scales_values():
  image = _noise(low=20, high=120)
  rng = np.random.default_rng(0)
  darker = ra.apply_op("Brightness", image, 2, rng)  # factor 0.46
  brighter = ra.apply_op("Brightness", image, 8, rng)  # factor 1.54
  assert darker.mean() / image.mean() == pytest.approx(0.46, abs=0.01)
  assert brighter.mean() / image.mean() == pytest.approx(1.54, abs=0.01)
  assert np.array_equal(ra.brightness(np.array([[[100, 200, 10]]], np.uint8), 1.5),
                        [[[150, 255, 15]]])  # scaled, clipped
  assert np.array_equal(ra.apply_op("Brightness", image, 5, rng), image)


def test_sharpness_blends_with_the_smoothed_image():
  image = np.full((7, 7, 3), 100, np.uint8)
  image[3, 3] = 230
  # smoothed: centre (5*230 + 8*100) / 13 = 150, its neighbours (12*100 + 230) / 13 = 110
  smooth = ra.sharpness(image, 0.0)
  assert smooth[3, 3, 0] == 150 and smooth[2, 3, 0] == 110 and smooth[0, 0, 0] == 100
  sharp = ra.sharpness(image, 2.0)
  assert sharp[3, 3, 0] == 255  # 150 + 2 * 80 = 310, clipped
  assert sharp[2, 3, 0] == 90 and sharp[4, 4, 0] == 90  # 110 + 2 * (100 - 110)
  assert sharp[5, 5, 0] == 100
  border = np.full((5, 5, 3), 100, np.uint8)
  border[0, 2] = 230  # the one-pixel border keeps its values for factors other than 0
  assert np.array_equal(ra.sharpness(border, 2.0)[0], border[0])
  assert np.array_equal(ra.apply_op("Sharpness", image, 5, np.random.default_rng(0)), image)


def test_autocontrast_and_equalize_match_pil():
  rng = np.random.default_rng(1)
  image = (rng.beta(2, 5, (40, 30, 3)) * 160 + 30).astype(np.uint8)  # skewed, not full range
  pil = Image.fromarray(image)
  stretched = ra.apply_op("AutoContrast", image, 5, rng)
  assert np.array_equal(stretched, np.asarray(ImageOps.autocontrast(pil)))
  assert stretched.reshape(-1, 3).min(0).tolist() == [0, 0, 0]
  assert stretched.reshape(-1, 3).max(0).tolist() == [255, 255, 255]
  equalized = ra.apply_op("Equalize", image, 5, rng)
  assert np.array_equal(equalized, np.asarray(ImageOps.equalize(pil)))
  assert not np.array_equal(equalized, image)
  flat = np.full((4, 4, 3), 77, np.uint8)  # one value per channel: both leave it alone
  assert np.array_equal(ra.autocontrast(flat), flat) and np.array_equal(ra.equalize(flat), flat)


def test_shear_moves_a_pixel_along_the_affine_map():
  # ShearX: (x, y) -> (x + s*y, y); at level 5 s = 0.15, so y = 20 moves 3 columns.
  assert _bright(ra.shear_x(_dot(5, 20), 0.15)) == [(20, 8)]
  assert _bright(ra.shear_x(_dot(5, 20), -0.15)) == [(20, 2)]
  assert _bright(ra.shear_x(_dot(5, 0), 0.15)) == [(0, 5)]  # the top row stays
  # ShearY: (x, y) -> (x, y + s*x)
  assert _bright(ra.shear_y(_dot(20, 5), 0.15)) == [(8, 20)]
  sheared = ra.shear_x(np.full((32, 32, 3), 255, np.uint8), 0.15)
  assert sheared[31, 0].tolist() == [128, 128, 128]  # the uncovered corner gets the grey fill


def test_translate_moves_by_whole_pixels_and_fills_grey():
  image = _noise()
  moved = ra.translate_x(image, 5.0)  # the content moves 5 pixels left
  assert np.array_equal(moved[:, :-5], image[:, 5:])
  assert np.all(moved[:, -5:] == 128)
  moved = ra.translate_y(image, -5.0)  # and 5 pixels down
  assert np.array_equal(moved[5:], image[:-5])
  assert np.all(moved[:5] == 128)


def _centroid(image):
  weights = image[..., 0].astype(np.float64)
  ys, xs = np.mgrid[:image.shape[0], :image.shape[1]]
  return (weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()


def test_rotate_by_the_mapped_angle():
  image = np.zeros((33, 33, 3), np.uint8)
  image[15:18, 25:28] = 255  # a block centred on (x, y) = (26, 16)
  # 90 degrees counter-clockwise about (16.5, 16.5) (cv2's centre W/2, H/2)
  x, y = _centroid(ra.rotate(image, 90.0, fill=(0, 0, 0)))
  assert (x, y) == pytest.approx((16.0, 7.0), abs=0.05)
  for seed in range(6):
    angle, = ra.op_argument("Rotate", 5, np.random.default_rng(seed))
    t = np.radians(angle)
    dx, dy = 26 - 16.5, 16 - 16.5
    want = (16.5 + np.cos(t) * dx + np.sin(t) * dy, 16.5 - np.sin(t) * dx + np.cos(t) * dy)
    assert _centroid(ra.rotate(image, angle, fill=(0, 0, 0))) == pytest.approx(want, abs=0.1)
  assert ra.rotate(image, 15.0)[0, 0].tolist() == [128, 128, 128]  # corners get the grey fill


# --- RandAugment ----------------------------------------------------------------------------


def test_randaugment_is_deterministic_per_rng_and_varies_across_seeds():
  image = _noise(h=24, w=36)
  augment = ra.RandAugment(2, 5)
  outs = [augment(image, np.random.default_rng(s)) for s in range(40)]
  for s in (0, 7):
    assert np.array_equal(augment(image, np.random.default_rng(s)), outs[s])
  assert all(o.dtype == np.uint8 and o.shape == (24, 36, 3) for o in outs)
  assert len({o.tobytes() for o in outs}) >= 10
  pil_out = augment(Image.fromarray(image), np.random.default_rng(7))
  assert np.array_equal(pil_out, outs[7])
  assert np.array_equal(ra.RandAugment(0, 5)(image, np.random.default_rng(0)), image)
  again = pickle.loads(pickle.dumps(augment))
  assert np.array_equal(again(image, np.random.default_rng(3)), outs[3])


def test_randaugment_apply_probability():
  # At M=5 a slot leaves this image unchanged when it is skipped (p 0.5) or draws Identity,
  # Brightness or Sharpness (3 of 10 ops, all no-ops at M=5): 0.5 + 0.5 * 0.3 = 0.65 per slot,
  # 0.65^2 = 0.4225 for both slots.
  image = _noise(h=16, w=16, low=40, high=200)
  augment = ra.RandAugment(2, 5)
  trials = 600
  unchanged = sum(np.array_equal(augment(image, np.random.default_rng(s)), image)
                  for s in range(trials))
  assert abs(unchanged / trials - 0.4225) < 0.06


def test_randaugment_refuses_bad_settings():
  with pytest.raises(ValueError):
    ra.RandAugment(2, 11)
  with pytest.raises(ValueError):
    ra.RandAugment(2, 5, ops=("Identity", "Cutout"))
  with pytest.raises(ValueError):
    ra.RandAugment()(np.zeros((4, 4), np.uint8), np.random.default_rng(0))


# --- the image-caption processor -------------------------------------------------------------

WORDS = ("a", "dog", "on", "the", "grass", "two", "cats", "picture", "of", "red", "circle",
         "circles", "green", "blue", "square", "squares", "triangle", "diamond", "left", "right",
         "at", "top", "bottom", "an", "image", "with", "drawing", "small", "large", "three",
         "in", "middle", "triangles", "diamonds", "second", "caption", "and", "one")
WORDS = WORDS + tuple(c for c in embedded.COLOURS if c not in WORDS)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("".join(t + "\n" for t in SPECIAL_TOKENS + WORDS + tuple(f"w{i}"
                                                                          for i in range(40))))
  return Tokenizer(str(path))


def _jpeg(width=64, height=48):
  ys, xs = np.mgrid[:height, :width]
  image = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], -1)
  out = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(out, "JPEG", quality=95)
  return out.getvalue()


def _processor(tok, **kwargs):
  return ImageTextProcessor(**{"image_size": 32, "tokenizer": tok, "text_length": 16, **kwargs})


def _words(tok, ids):
  return [tok._make().id_to_token(int(i)) for i in ids]


def test_train_rows_have_the_blip_keys_shapes_and_cleaned_captions(tok):
  proc = _processor(tok)
  example = {"image": _jpeg(), "caption": ["A Dog: on the GRASS!!", "Two cats."]}
  seen = set()
  for seed in range(8):
    row = proc(example, np.random.default_rng(seed))
    assert set(row) == {"pixels", "input_ids", "attention_mask"}
    assert row["pixels"].dtype == np.uint8 and row["pixels"].shape == (32, 32, 3)
    assert row["input_ids"].dtype == np.int32 and row["input_ids"].shape == (16,)
    assert row["attention_mask"].dtype == np.int32 and row["attention_mask"].shape == (16,)
    assert row["input_ids"][0] == tok.cls_id
    n = int(row["attention_mask"].sum())
    assert row["input_ids"][n - 1] == tok.sep_id and np.all(row["input_ids"][n:] == tok.pad_id)
    seen.add(" ".join(_words(tok, row["input_ids"][1:n - 1])))
  assert seen == {"a dog on the grass", "two cats"}  # one of the captions, each cleaned


def test_train_is_deterministic_per_rng_and_varies(tok):
  proc = _processor(tok)
  example = {"image": _jpeg(), "caption": "a dog"}
  rows = [proc(example, np.random.default_rng(s))["pixels"] for s in range(12)]
  assert np.array_equal(proc(example, np.random.default_rng(3))["pixels"], rows[3])
  assert len({r.tobytes() for r in rows}) == 12
  again = pickle.loads(pickle.dumps(proc))
  assert np.array_equal(again(example, np.random.default_rng(5))["pixels"], rows[5])


def test_eval_is_the_whole_image_and_the_first_caption(tok):
  data = _jpeg()
  proc = _processor(tok, train=False)
  example = {"image": data, "caption": ["Two cats.", "a dog"], "label": 4}
  row = proc(example, np.random.default_rng(0))
  assert np.array_equal(proc(example, np.random.default_rng(1))["pixels"], row["pixels"])
  whole = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
  assert np.array_equal(row["pixels"], np.asarray(whole))
  n = int(row["attention_mask"].sum())
  assert _words(tok, row["input_ids"][1:n - 1]) == ["two", "cats"]
  assert row["label"] == 4 and row["label"].dtype == np.int32
  assert "label" not in proc({"image": data, "caption": "a dog"}, None)


def test_train_crop_flip_and_augment_are_the_only_differences_from_eval(tok):
  data = _jpeg()  # 64x48: a crop of scale 1 and ratio 4/3 is the whole image
  eval_pixels = _processor(tok, train=False)({"image": data, "caption": "a"}, None)["pixels"]
  plain = _processor(tok, crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3),
                     horizontal_flip=False, randaugment=())
  assert np.array_equal(plain({"image": data, "caption": "a"},
                              np.random.default_rng(0))["pixels"], eval_pixels)
  flipping = _processor(tok, crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3), randaugment=())
  outs = [flipping({"image": data, "caption": "a"}, np.random.default_rng(s))["pixels"]
          for s in range(20)]
  flipped = sum(np.array_equal(o, eval_pixels[:, ::-1]) for o in outs)
  kept = sum(np.array_equal(o, eval_pixels) for o in outs)
  assert flipped + kept == 20 and 4 <= flipped <= 16


def test_train_crop_is_cropped_then_resized_like_torchvision(tok):
  data = _jpeg(96, 72)
  image = Image.open(io.BytesIO(data)).convert("RGB")
  proc = _processor(tok, horizontal_flip=False, randaugment=())
  for seed in range(4):
    box = T.random_resized_crop_box(96, 72, np.random.default_rng(seed), (0.2, 1.0),
                                    (3 / 4, 4 / 3))
    assert box[2] * box[3] < 96 * 72  # a real crop
    left, top, w, h = box
    want = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    row = proc({"image": data, "caption": "a"}, np.random.default_rng(seed))
    assert np.array_equal(row["pixels"], np.asarray(want))


def test_captions_are_cut_to_max_words(tok):
  caption = " ".join(f"w{i}" for i in range(40))
  example = {"image": _jpeg(), "caption": caption}
  row = _processor(tok, text_length=64)(example, np.random.default_rng(0))
  assert int(row["attention_mask"].sum()) == 30 + 2
  row = _processor(tok, text_length=64, max_words=0)(example, np.random.default_rng(0))
  assert int(row["attention_mask"].sum()) == 40 + 2
  raw = _processor(tok, clean_captions=False, max_words=3)
  assert raw.caption("A Dog: on the GRASS!!") == "A Dog: on"


def test_embedded_corpus_records(tok):
  proc = _processor(tok, image_size=48, text_length=24)
  for seed in range(4):
    record = embedded.paired_example(np.random.default_rng(seed))
    row = proc(record, np.random.default_rng(seed))
    assert row["pixels"].shape == (48, 48, 3) and row["input_ids"][0] == tok.cls_id
    n = int(row["attention_mask"].sum())
    assert n == len(clean_caption(record["caption"]).split()) + 2
    assert tok.unk_id not in row["input_ids"][:n]


@pytest.mark.parametrize("example, reason", [
    ({"image": b"not an image", "caption": "a dog"}, "undecodable"),
    ({"image": b"", "caption": "a dog"}, "empty_image"),
    ({"caption": "a dog"}, "missing_image"),
    ({"image": _jpeg()}, "missing_text"),
    ({"image": _jpeg(), "caption": "  ...!! "}, "empty_text"),  # nothing left after cleaning
    ({"image": _jpeg()[:300], "caption": "a dog"}, "truncated_image"),
])
def test_bad_examples_become_counted_skips(tok, example, reason):
  for train in (True, False):
    assert _processor(tok, train=train)(example, np.random.default_rng(0)) == {"_skip": reason}
  assert reason in SKIP_REASONS
  assert _processor(tok)({"_skip": "corrupt_record"}, None) == {"_skip": "corrupt_record"}


def test_refuses_other_kinds_and_bad_settings(tok):
  with pytest.raises(ValueError, match="paired"):
    _processor(tok, kind="image")
  with pytest.raises(ValueError, match="randaugment"):
    _processor(tok, randaugment=(2,))
  with pytest.raises(ValueError):
    _processor(tok, randaugment=(2, 12))
