"""Byte encodings of a teacher's top-k targets, one token at a time (format: ``docs/offline.md``).

Each cached token holds ``k`` token ids, their log-probabilities and the mass outside them. Two
encodings, both fixed-width per token so a row's bytes split into tokens by plain slicing:

* ``"compact"`` (default): ids bit-packed at ``ceil(log2(vocab_rows))`` bits; log-probs as one
  byte each on a square-root grid of the distance to the top-1 log-prob; one float16
  ``log(top-k mass)`` per token, from which the tail mass is exact to float16 precision and the
  decoded log-probs are renormalised. ``ceil(k * bits / 8) + k + 2`` bytes per token.
* ``"fp16"`` (reference, like DistillKit): int32 ids, float16 log-probs, float32 tail mass;
  ``6 k + 4`` bytes per token.

Entries are stored sorted by log-prob, highest first. All multi-byte values are little-endian.

With ``sampled=True`` the entries are sampled targets (:func:`distill.formats.sampling.priority_sample`):
log-weights whose exponentials estimate the teacher's probabilities without bias and may sum above 1.
The layout is the same; the compact mass field then holds ``log(sum of weights)`` unclamped, and the
decoded tail mass is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["ENCODINGS", "GRID_MAX_NATS", "EncodedTokens", "Encoding", "bytes_per_token"]

EncodingName = Literal["compact", "fp16"]
ENCODINGS: tuple[str, ...] = ("compact", "fp16")

# The compact grid covers log-prob gaps to the top-1 entry of up to this many nats; entries further
# below (less than e^-24 ~ 4e-11 of the top-1 probability) are stored as "zero mass".
GRID_MAX_NATS = 24.0
# Codes 0..254 are grid points d = GRID_MAX_NATS * (code / 254)^2; 255 means log-prob -inf.
_GRID_STEPS = 254
_ZERO_MASS_CODE = 255


@dataclass(frozen=True)
class EncodedTokens:
    """The bytes of ``n`` tokens in one encoding (one row's worth, concatenated token after token).

    Attributes:
        ids: ``n * id_bytes_per_token`` bytes.
        logprobs: ``n * logprob_bytes_per_token`` bytes.
        mass: ``n * mass_bytes_per_token`` bytes (compact: float16 ``log(top-k mass)``; fp16: float32
            tail mass).
    """

    ids: bytes
    logprobs: bytes
    mass: bytes


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``[n, k]`` unsigned ints < ``2**bits`` -> ``[n, ceil(k * bits / 8)]`` uint8, LSB-first per token."""
    n, k = values.shape
    as_bytes = values.astype("<u4").view(np.uint8).reshape(n, k, 4)
    as_bits = np.unpackbits(as_bytes, axis=2, bitorder="little")[:, :, :bits]
    return np.packbits(as_bits.reshape(n, k * bits), axis=1, bitorder="little")


def _unpack_bits(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits`: ``[n, ceil(k * bits / 8)]`` uint8 -> ``[n, k]`` int64."""
    n = packed.shape[0]
    as_bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits].reshape(n, k, bits)
    padded = np.zeros((n, k, 32), dtype=np.uint8)
    padded[:, :, :bits] = as_bits
    return np.packbits(padded, axis=2, bitorder="little").view("<u4").reshape(n, k).astype(np.int64)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64 of ``[n, k]``; ``-inf`` for rows that are all ``-inf``."""
    values = values.astype(np.float64)
    top = values.max(axis=1, keepdims=True)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(values - safe_top).sum(axis=1)) + safe_top[:, 0]).astype(np.float64)


@dataclass(frozen=True)
class Encoding:
    """How ``k`` top-k entries per token become bytes.

    Attributes:
        name: ``"compact"`` or ``"fp16"``.
        k: entries per token.
        vocab_rows: ids are in ``[0, vocab_rows)``; sets the compact id width.
        sampled: the entries are sampled targets (log-weights, no tail) rather than the top-k.
    """

    name: str
    k: int
    vocab_rows: int
    sampled: bool = False

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise ValueError(f"Unknown cache encoding {self.name!r}; choose one of {', '.join(ENCODINGS)}.")
        if self.k < 1 or self.vocab_rows < self.k:
            raise ValueError(f"Need 1 <= k <= vocab_rows; got k={self.k}, vocab_rows={self.vocab_rows}.")

    @property
    def id_bits(self) -> int:
        """Bits per stored id: ``ceil(log2(vocab_rows))`` (compact) or 32 (fp16)."""
        return max(1, math.ceil(math.log2(self.vocab_rows))) if self.name == "compact" else 32

    @property
    def id_bytes_per_token(self) -> int:
        return math.ceil(self.k * self.id_bits / 8)

    @property
    def logprob_bytes_per_token(self) -> int:
        return self.k if self.name == "compact" else 2 * self.k

    @property
    def mass_bytes_per_token(self) -> int:
        return 2 if self.name == "compact" else 4

    @property
    def bytes_per_token(self) -> int:
        """Encoded bytes per cached token (before the file's compression)."""
        return self.id_bytes_per_token + self.logprob_bytes_per_token + self.mass_bytes_per_token

    def describe(self) -> dict[str, object]:
        """The manifest's record of this encoding: everything a reader needs to decode."""
        targets = {"targets": "sampled" if self.sampled else "top_k"}
        if self.name == "compact":
            mass = (
                "float16 logmass = log(sum of the sampled weights), may be > 0; tail_mass = 0"
                if self.sampled
                else "float16 logmass = log(sum of top-k probs); tail_mass = -expm1(logmass)"
            )
            return targets | {
                "name": "compact",
                "k": self.k,
                "ids": f"uint{self.id_bits} bit-packed, LSB first, per token padded to a byte",
                "id_bits": self.id_bits,
                "logprobs": f"uint8 code c: log-prob = top1 - {GRID_MAX_NATS} * (c / 254)^2, 255 = -inf; "
                "renormalised so that logsumexp = logmass",
                "grid_max_nats": GRID_MAX_NATS,
                "mass": mass,
                "bytes_per_token": self.bytes_per_token,
            }
        return targets | {
            "name": "fp16",
            "k": self.k,
            "ids": "int32",
            "id_bits": 32,
            "logprobs": "float16",
            "mass": "float32 tail_mass = 0" if self.sampled else "float32 tail_mass = 1 - sum of top-k probs",
            "bytes_per_token": self.bytes_per_token,
        }

    def encode(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail_mass: np.ndarray) -> EncodedTokens:
        """Encode ``n`` tokens.

        Args:
            topk_ids: ``[n, k]`` distinct ids per token, in ``[0, vocab_rows)``.
            topk_logprobs: ``[n, k]`` log-probabilities (nats, temperature 1), any order; ``-inf`` allowed.
            tail_mass: ``[n]`` probability outside the top-k, computed without cancellation (float64);
                ignored for sampled targets (stored as 0).
        """
        topk_ids = np.asarray(topk_ids)
        topk_logprobs = np.asarray(topk_logprobs, dtype=np.float64)
        n = topk_ids.shape[0]
        if topk_ids.shape != (n, self.k) or topk_logprobs.shape != (n, self.k):
            raise ValueError(f"Expected [n, {self.k}] ids and log-probs; got {topk_ids.shape}, {topk_logprobs.shape}.")
        if n and (topk_ids.min() < 0 or topk_ids.max() >= self.vocab_rows):
            raise ValueError(f"Top-k ids must be in [0, {self.vocab_rows}); got up to {int(topk_ids.max())}.")
        # Highest first (stable, so ties keep their given order): the compact grid measures from the top.
        order = np.argsort(-topk_logprobs, axis=1, kind="stable")
        topk_ids = np.take_along_axis(topk_ids, order, axis=1)
        topk_logprobs = np.take_along_axis(topk_logprobs, order, axis=1)
        tail = np.clip(np.asarray(tail_mass, dtype=np.float64).reshape(n), 0.0, 1.0)
        if self.sampled:
            tail = np.zeros(n)
        if self.name == "fp16":
            return EncodedTokens(
                topk_ids.astype("<i4").tobytes(),
                topk_logprobs.astype("<f2").tobytes(),
                tail.astype("<f4").tobytes(),
            )
        top1 = topk_logprobs[:, :1]
        with np.errstate(invalid="ignore"):
            gap = np.where(np.isfinite(topk_logprobs), top1 - topk_logprobs, np.inf)
        codes = np.rint(np.sqrt(np.clip(gap, 0.0, GRID_MAX_NATS) / GRID_MAX_NATS) * _GRID_STEPS)
        codes = np.where(gap <= GRID_MAX_NATS, codes, _ZERO_MASS_CODE).astype(np.uint8)
        if self.sampled:
            logmass = _logsumexp(topk_logprobs)
        else:
            with np.errstate(divide="ignore"):
                logmass = np.minimum(np.log1p(-tail), 0.0)
        return EncodedTokens(
            _pack_bits(topk_ids, self.id_bits).tobytes(), codes.tobytes(), logmass.astype("<f2").tobytes()
        )

    def decode(self, encoded: EncodedTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode the tokens of :meth:`encode`.

        Returns:
            ``(topk_ids [n, k] int64, topk_logprobs [n, k] float32, tail_mass [n] float32)``, highest
            log-prob first.

        Raises:
            ValueError: the byte strings do not hold a whole number of tokens, or disagree on ``n``.
        """
        n = len(encoded.mass) // self.mass_bytes_per_token
        sizes = (len(encoded.ids), len(encoded.logprobs), len(encoded.mass))
        if sizes != (n * self.id_bytes_per_token, n * self.logprob_bytes_per_token, n * self.mass_bytes_per_token):
            raise ValueError(f"Encoded sizes {sizes} do not hold a whole number of {self.name} tokens (k={self.k}).")
        if self.name == "fp16":
            ids = np.frombuffer(encoded.ids, dtype="<i4").reshape(n, self.k).astype(np.int64)
            logprobs = np.frombuffer(encoded.logprobs, dtype="<f2").reshape(n, self.k).astype(np.float32)
            return ids, logprobs, np.frombuffer(encoded.mass, dtype="<f4").astype(np.float32)
        packed = np.frombuffer(encoded.ids, dtype=np.uint8).reshape(n, self.id_bytes_per_token)
        ids = _unpack_bits(packed, self.k, self.id_bits)
        codes = np.frombuffer(encoded.logprobs, dtype=np.uint8).reshape(n, self.k)
        gap = GRID_MAX_NATS * (codes.astype(np.float64) / _GRID_STEPS) ** 2
        relative = np.where(codes == _ZERO_MASS_CODE, -np.inf, -gap)
        logmass = np.frombuffer(encoded.mass, dtype="<f2").astype(np.float64)
        # Renormalise so the top-k mass is exactly the stored one: quantisation errors then never push
        # the total above 1, and top-k + tail sums to 1.
        with np.errstate(invalid="ignore"):
            logprobs = relative + (logmass - _logsumexp(relative))[:, None]
        logprobs = np.where(np.isfinite(relative), logprobs, -np.inf)
        tail = np.zeros(n) if self.sampled else -np.expm1(logmass)
        return ids, logprobs.astype(np.float32), tail.astype(np.float32)


def bytes_per_token(encoding: str, k: int, vocab_rows: int) -> int:
    """Encoded bytes per cached token of ``encoding`` at ``k`` entries and ``vocab_rows`` ids (top-k or sampled)."""
    return Encoding(encoding, k, vocab_rows).bytes_per_token
