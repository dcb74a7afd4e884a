"""The input side: sources, the builder, transforms, masking, the per-step corpus mixture.

    sources.py     embedded | array_record | tfds sources behind one interface
    records.py     our own ArrayRecord record format and shard writer
    build.py       `python -m flava_jax.data.build`: plain files -> shards, with a skip summary
    embedded.py    the default corpus (drawn scenes with captions, labelled scenes, Python docs)
                   and its held-out evaluation splits (retrieval, sentence pairs, VQA, entailment)
    examples.py    the canonical example and the skip reasons
    transforms.py  decoding and FLAVA's two views of one crop
    masking.py     BEiT block masks and MLM masking
    tokenizer.py   WordPiece from a local vocab file
    preprocess.py  one example -> one batch row, per corpus kind
    mixture.py     skip-counting batches and the seeded per-step corpus choice
    pipeline.py    config -> DataIterator (checkpointable), and global arrays for the mesh
"""
