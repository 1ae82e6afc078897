"""The random streams of a run: seeds derived from ``--seed``, generators seeded per sample, and
the generator state a checkpoint keeps.

Every stream is keyed by what it is for, ``derive_seed(seed, "tes", epoch, "draw")``, and its
seed is a hash of the whole key. Arithmetic on seeds is what goes wrong otherwise: ``seed + 1``
for stage 2 is the next run's stage-1 seed, ``(epoch << 32) + position`` loses its epoch in
torch's CPU generator (which keeps only the low 32 bits of a seed), and NumPy's and torch's
global generators seeded with the same number produce the same Mersenne-Twister words.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping

import numpy as np
import torch

# torch's CPU generator (mt19937), NumPy's RandomState and scikit-learn take 32-bit seeds.
SEED_BITS = 32
_LOW_32 = (1 << 32) - 1


def derive_seed(*key: int | str, bits: int = SEED_BITS) -> int:
    """A seed in [0, 2**bits) that is a hash of ``key`` (ints and strings, e.g. the run's
    seed, a stage, an epoch, a purpose): every bit depends on every part of the key, so two
    keys that differ anywhere give unrelated seeds. Stable across Python versions and
    machines. ``bits`` up to 256."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=32, person=b"GET seeds").digest()
    return int.from_bytes(digest, "little") >> (256 - bits)


def sample_seeds(n: int, *key: int | str) -> np.ndarray:
    """``n`` independent 64-bit seeds (uint64), one per position 0..n-1 of a stream keyed by
    ``key``: the raw outputs of a PCG64 generator keyed with 128 bits of ``derive_seed``
    (raw outputs, unlike NumPy's distributions, are the same in every NumPy version)."""
    return np.random.PCG64(derive_seed(*key, bits=128)).random_raw(n)


def seed_sample(seed: int) -> None:
    """Seed every global generator an augmentation may draw from with a 64-bit sample seed:
    torch's CPU generator with its low 32 bits, NumPy's global one with its high 32 bits
    (different words, so the two never produce the same stream), Python's with all of it."""
    torch.default_generator.manual_seed(seed & _LOW_32)
    np.random.seed(seed >> 32)
    random.seed(seed)


def seed_everything(*key: int | str) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA's too) for the stream
    ``key`` (e.g. the run's seed and a stage), each with its own derived seed."""
    random.seed(derive_seed(*key, "python"))
    np.random.seed(derive_seed(*key, "numpy"))
    torch.manual_seed(derive_seed(*key, "torch"))


def rng_state() -> dict:
    """The state of every global random generator, as weights-only-safe data."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
        np_state["has_gauss"], np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
