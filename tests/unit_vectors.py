"""Unit image vectors for the LanceDB and cross-batch tests: random rows, and a row at a chosen distance."""

from __future__ import annotations

import numpy as np
import pandas as pd

PH = {"name": "placeholder", "revision": "v1", "dim": 8}  # the model identity the tests' tables carry


def vectors_frame(keys: list[str], seed: int = 0, dim: int = 8) -> pd.DataFrame:
    """What the embed step hands LanceDB: key, unit vector, sha256, one row per key."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(keys), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return pd.DataFrame({"key": keys, "vector": list(vecs), "sha256": [f"{i:064x}" for i in range(len(keys))]})


def at_distance(base: np.ndarray, distance: float, rng) -> np.ndarray:
    """A unit vector at exactly `distance` (1 - cos) from the unit vector `base`."""
    noise = rng.normal(size=base.shape)
    noise -= (noise @ base) * base
    noise /= np.linalg.norm(noise)
    cos = 1.0 - distance
    return (cos * base + np.sqrt(1 - cos**2) * noise).astype(np.float32)
