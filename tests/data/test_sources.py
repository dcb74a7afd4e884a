"""Sources: our own shards, TFDS ArrayRecord datasets, the embedded corpus; start-up errors."""

import os
import re

import numpy as np
import pytest

from flava_jax.data import build, embedded, sources, tokenizer
from tests.data import builds, helpers


def test_own_shards_read_back_canonical_examples(tmp_path):
  examples = [{"image": helpers.jpeg((i * 30, 0, 0)), "caption": f"caption {i}", "id": str(i)}
              for i in range(5)]
  helpers.write_shards(str(tmp_path / "pairs"), examples + [b"\x93not msgpack"], num_shards=2)
  cfg = sources.SourceConfig(source="array_record", paths=str(tmp_path))
  src = sources.open_source(cfg, "data.corpora.paired")
  src.check("paired")
  assert len(src) == 6
  got = sorted((src[i] for i in range(6)), key=str)
  skips = [g for g in got if "_skip" in g]
  assert skips == [{"_skip": "corrupt_record"}]
  captions = sorted(g["caption"] for g in got if "caption" in g)
  assert captions == [f"caption {i}" for i in range(5)]
  by_caption = {g["caption"]: g["image"] for g in got if "caption" in g}
  assert by_caption["caption 3"] == examples[3]["image"]  # bytes kept as written


def test_field_mapping_and_missing_fields(tmp_path):
  helpers.write_shards(str(tmp_path / "t"), [{"text": "hello there", "id": "a"}], num_shards=1)
  cfg = sources.SourceConfig(source="array_record", paths=str(tmp_path),
                             fields={"text": "id", "caption": ""})
  src = sources.open_source(cfg, "data.corpora.text")
  assert src[0] == {"text": "a"}
  bad = sources.SourceConfig(source="array_record", paths=str(tmp_path),
                             fields={"text": "body"})
  with pytest.raises(ValueError, match=r"data\.corpora\.text\.fields\.text='body'.*'id'"):
    sources.open_source(bad, "data.corpora.text").check("text")
  with pytest.raises(ValueError, match=r"data\.corpora\.text\.fields\.image"):
    sources.open_source(cfg, "data.corpora.text").check("image")


def test_empty_and_missing_sources_are_start_up_errors(tmp_path):
  helpers.write_shards(str(tmp_path / "empty"), [], num_shards=1)
  cfg = sources.SourceConfig(source="array_record", paths=str(tmp_path))
  with pytest.raises(ValueError, match=r"data\.corpora\.x: the source is empty"):
    sources.open_source(cfg, "data.corpora.x").check("text")
  cfg = sources.SourceConfig(source="array_record", paths=str(tmp_path / "nothing-*"))
  with pytest.raises(ValueError, match=r"data\.corpora\.x\.paths=.*matches no ArrayRecord"):
    sources.open_source(cfg, "data.corpora.x")
  cfg = sources.SourceConfig(source="tfds", name="no_such_dataset", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"data\.corpora\.x: TFDS dataset 'no_such_dataset'"):
    sources.open_source(cfg, "data.corpora.x")
  with pytest.raises(ValueError, match="source='hdfs' is not one of"):
    sources.SourceConfig(source="hdfs")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  helpers.write_tfds_dataset(path, n=6)
  return path


def test_tfds_data_source_keeps_images_encoded(tfds_dir):
  cfg = sources.SourceConfig(source="tfds", name="tiny_captions", split="train",
                             data_dir=tfds_dir,
                             fields={"image": "image", "caption": "captions/text",
                                     "label": "label"})
  src = sources.open_source(cfg, "data.corpora.coco")
  src.check("paired")
  assert len(src) == 6
  seen = set()
  for i in range(6):
    example = src[i]
    assert isinstance(example["image"], bytes) and example["image"][:2] == b"\xff\xd8"
    k = int(example["label"])
    captions = [c.decode() for c in example["caption"]]  # the nested field, all captions
    assert len(captions) == 2 and captions[0].endswith(" a")
    index = int(captions[0].split()[1])
    assert k == index % 3
    red = helpers.as_rgb(example["image"])[..., 0].mean()
    assert abs(red - 20 * index) < 6  # the image written for that example
    seen.add(index)
  assert seen == set(range(6))
  wrong = sources.SourceConfig(source="tfds", name="tiny_captions", data_dir=tfds_dir,
                               fields={"image": "image", "caption": "captions/txt"})
  with pytest.raises(ValueError, match=r"fields\.caption='captions/txt'.*captions/text"):
    sources.open_source(wrong, "data.corpora.coco").check("paired")


def test_embedded_corpus_parts():
  src = sources.open_source(sources.SourceConfig(name="paired", split="test"), "e")
  captions = [src[i]["caption"] for i in range(len(src))]
  assert len(captions) == embedded.SIZES[("paired", "test")] == len(set(captions))
  image = sources.open_source(sources.SourceConfig(name="image", split="train"), "e")
  labels = np.array([image[i]["label"] for i in range(200)])
  assert labels.min() >= 0 and labels.max() < len(embedded.CLASS_NAMES)
  assert len(np.unique(labels)) > 20  # most of the 32 classes within 200 examples
  text = sources.open_source(sources.SourceConfig(name="text", split="train"), "e")
  assert len(text) > 500 and all(len(text[i]["text"]) > 100 for i in range(20))
  tok = tokenizer.Tokenizer(embedded.vocab_file())
  assert tok.vocab_size == embedded.VOCAB_SIZE and tok.special_ids == (0, 1, 2, 3, 4)
  ids, mask, starts = tok.encode("two small red circles", 10)
  assert ids[0] == tok.cls_id and ids[mask.sum() - 1] == tok.sep_id and tok.unk_id not in ids
  assert (mask[:mask.sum()] == 1).all() and (ids[mask.sum():] == tok.pad_id).all()
  assert starts.sum() == 4
  with pytest.raises(ValueError, match=r"e\.name='photos'"):
    sources.open_source(sources.SourceConfig(name="photos"), "e")


def test_embedded_scenes_are_deterministic():
  a = embedded.paired_example(np.random.default_rng(5))
  b = embedded.paired_example(np.random.default_rng(5))
  assert a == b
  c = embedded.image_example(np.random.default_rng(6))
  colour, shape = embedded.CLASS_NAMES[c["label"]].split()
  pixels = helpers.as_rgb(c["image"]).reshape(-1, 3).astype(int)
  target = np.array(embedded.COLOURS[colour])
  assert (np.abs(pixels - target).sum(-1) < 60).mean() > 0.01  # the class's colour is drawn
  assert shape in embedded.SHAPES


def test_check_fields_names_what_needs_the_missing_field(tmp_path):
  helpers.write_shards(str(tmp_path / "t"), [{"text": "hello there", "id": "a"}], num_shards=1)
  cfg = sources.SourceConfig(source="array_record", paths=str(tmp_path),
                             fields={"text": "text", "text_pair": ""})
  src = sources.open_source(cfg, "eval.glue")
  src.check_fields(("text",), "the GLUE evaluation")
  with pytest.raises(ValueError, match=r"eval\.glue\.fields\.text_pair is empty, but the GLUE "
                                       r"evaluation needs it"):
    src.check_fields(("text", "text_pair"), "the GLUE evaluation")
  with pytest.raises(ValueError, match=r"eval\.vqa\.fields\.answers='answers': no such field.*"
                                       r"\['id', 'text'\]"):
    sources.open_source(sources.SourceConfig(source="array_record", paths=str(tmp_path)),
                        "eval.vqa").check_fields(("text", "answers"), "the VQA evaluation")
  with pytest.raises(ValueError, match=r"unknown canonical fields \['question'\]"):
    src.check_fields(("question",), "the VQA evaluation")
  # An evaluation maps the embedded VQA records' own names onto canonical ones.
  vqa = sources.open_source(sources.SourceConfig(
      name="vqa", split="test", fields={"image": "image", "text": "question",
                                        "answers": "answers"}), "eval.vqa")
  vqa.check_fields(("image", "text", "answers"), "the VQA evaluation")
  example = vqa[0]
  assert set(example) == {"image", "text", "answers"} and example["text"].endswith("?")
  assert len(example["answers"]) == embedded.VQA_ANNOTATORS


# --- a folder of several builds ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  """The builder's paired, image and text shards in one folder (and their summaries)."""
  return builds.mixed_folder(str(tmp_path_factory.mktemp("mixed")))


@pytest.mark.parametrize("kind", ["paired", "image", "text"])
def test_a_folder_gives_each_corpus_the_shards_of_its_kind(mixed_folder, kind):
  folder, written = mixed_folder
  cfg = sources.SourceConfig(source="array_record", paths=folder)
  src = sources.open_source(cfg, f"data.corpora.{kind}", kind)
  src.check(kind)  # the text corpus used to stop here on the image shards' fields
  assert len(src) == written[kind]
  assert all(os.path.basename(p).startswith(f"{kind}-") for p in src.paths)
  examples = [src[i] for i in range(len(src))]
  assert not [e for e in examples if "_skip" in e]
  needed = sources.REQUIRED_FIELDS[kind]
  assert all(set(needed) <= set(e) for e in examples)
  if kind == "image":  # the image corpus no longer reads the paired shards
    assert all("caption" not in e and "label" in e for e in examples)
  # Globs and file lists are read as given, whatever their kind.
  both = sources.open_source(sources.SourceConfig(
      source="array_record", paths=f"{folder}/paired-*,{folder}/text-*"), "x")
  assert len(both) == written["paired"] + written["text"]


def test_a_build_with_its_own_prefix_is_known_by_its_summary(tmp_path):
  out = str(tmp_path / "shards")
  paths = builds.inputs(str(tmp_path / "inputs"))
  build.build("paired", paths["paired"], out, prefix="flickr30k_test")
  build.build("image", paths["image"], out)
  assert sorted(sources.folder_kinds(out)) == ["image", "paired"]
  src = sources.open_source(sources.SourceConfig(source="array_record", paths=out), "d", "paired")
  assert len(src) == 6 and "flickr30k_test-" in src.paths[0]


def test_a_folder_without_shards_of_the_corpus_kind_is_refused_at_start_up(tmp_path, mixed_folder):
  folder, _ = mixed_folder
  out = str(tmp_path / "no_paired")
  paths = builds.inputs(str(tmp_path / "inputs"))
  for kind in ("image", "text"):
    build.build(kind, paths[kind], out, text_chars=40)
  cfg = sources.SourceConfig(source="array_record", paths=out)
  with pytest.raises(ValueError, match=(
      rf"^data\.corpora\.web\.paths='{re.escape(out)}': the folder holds image shards \(1 file\), "
      r"text shards \(1 file\) and no paired shards; name the shards to read")):
    sources.open_source(cfg, "data.corpora.web", "paired")
  # One other kind only: refused as well (a text corpus pointed at image shards).
  only_images = str(tmp_path / "images")
  build.build("image", paths["image"], only_images)
  with pytest.raises(ValueError, match=r"holds image shards \(1 file\) and no text shards"):
    sources.open_source(sources.SourceConfig(source="array_record", paths=only_images), "t",
                        "text")
  # Files whose kind nobody can tell, beside another kind: refused, naming them.
  build.build("image", paths["image"], str(tmp_path / "odd"))
  helpers.write_shards(str(tmp_path / "odd" / "part"), [{"text": "x"}], num_shards=1)
  with pytest.raises(ValueError, match=r"image shards \(1 file\), shards of no recognisable kind "
                                       r"part-\* \(1 file\) and no text shards"):
    sources.open_source(sources.SourceConfig(source="array_record",
                                             paths=str(tmp_path / "odd")), "t", "text")
  # A reader that no builder kind fits (kind None) takes a folder's only set, never a mixture.
  with pytest.raises(ValueError, match=r"holds image shards .*paired shards .*text shards .*"
                                       r"this split reads one set of them"):
    sources.open_source(sources.SourceConfig(source="array_record", paths=folder), "eval.vqa")
  assert len(sources.open_source(sources.SourceConfig(source="array_record", paths=only_images),
                                 "eval.x")) == 8


def test_evaluation_splits_read_the_kind_their_fields_need():
  assert sources.kind_for_fields(("image", "caption")) == "paired"
  assert sources.kind_for_fields(("image", "label")) == "image"
  assert sources.kind_for_fields(("text",)) == "text"
  assert sources.kind_for_fields(("image", "text", "answers")) is None
  assert sources.kind_for_fields(("image",)) is None  # paired and image shards both have one
