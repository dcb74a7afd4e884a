"""Input side: masking (here), and later sources, transforms and the corpus mixture."""
