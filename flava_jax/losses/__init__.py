"""FLAVA's objectives as pure functions of logits/embeddings, labels and weights (static shapes)."""
