"""Flax modules: transformer blocks, the three encoders, heads, the dVAE and the FLAVA assembly."""
