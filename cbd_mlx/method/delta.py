"""Anchors coded as low-bit deltas against the Subset of their lineage parent.

A distilled anchor stays close to the Subset of its parent that it was
pruned to (on the embedded chain, 9.4% of the norm of its linear weights),
so its difference from that Subset quantizes to 2-4 bits with little loss,
where the weights themselves need 5. Pure numpy, arrays in and arrays out:
the decoded weights are bit-identical on every machine, so a materialized
anchor can be checked against the sha256 its chain records.

Affine round-to-nearest in groups along the last axis, as mlx's quantizer:
``w ~ code * scale + bias`` with fp16 scales and biases; at 2-4 bits each
group's range is clipped to whichever of a few shrinks gives the least
squared error. Vectors (norms,
biases) are stored in full; tensors equal to the base (a frozen embedding)
are not stored at all.
"""

from __future__ import annotations

import numpy as np

from ..errors import CBDError

DELTA_BITS = (2, 3, 4, 8)
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # range shrinks tried per group at 2-4 bits


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes < 2**bits -> a little-endian bit stream (uint8)."""
    planes = (codes.reshape(-1, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def _unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def quantize(w: np.ndarray, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """Affine RTN of a 2-D+ array in groups of ``group_size`` along its last
    axis: {"codes": packed uint8, "scales": fp16, "biases": fp16}."""
    if bits not in DELTA_BITS:
        raise CBDError(f"delta bits must be one of {DELTA_BITS}, not {bits}")
    if w.shape[-1] % group_size:
        raise CBDError(f"last axis {w.shape[-1]} is not a multiple of the group size {group_size}")
    g = w.astype(np.float32).reshape(-1, group_size)
    best = None
    for clip in CLIPS if bits <= 4 else (1.0,):  # per group, the range that gives the least squared error
        codes, scales, biases = _rtn(g, bits, clip)
        err = ((codes * scales.astype(np.float32)[:, None] + biases.astype(np.float32)[:, None] - g) ** 2).sum(1)
        if best is None:
            best = [codes, scales, biases, err]
        else:
            better = err < best[3]
            for i, new in enumerate((codes, scales, biases, err)):
                best[i][better] = new[better]
    codes, scales, biases, _ = best
    return {"codes": _pack_codes(codes, bits), "scales": scales, "biases": biases}


def _rtn(g: np.ndarray, bits: int, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest codes of groups ``g`` over their [min, max] range
    shrunk by ``clip`` about its middle: (codes, fp16 scales, fp16 biases)."""
    lo, hi = g.min(axis=1), g.max(axis=1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * clip
    scales = (2 * half / (2**bits - 1)).astype(np.float16)
    biases = (mid - half).astype(np.float16)
    s = scales.astype(np.float32)[:, None]
    codes = np.clip(np.rint((g - biases.astype(np.float32)[:, None]) / np.where(s > 0, s, 1.0)), 0, 2**bits - 1)
    codes[(s == 0)[:, 0]] = 0
    return codes.astype(np.uint8), scales, biases


def dequantize(q: dict[str, np.ndarray], shape: tuple[int, ...], bits: int, group_size: int) -> np.ndarray:
    count = int(np.prod(shape))
    codes = _unpack_codes(q["codes"], bits, count).reshape(-1, group_size).astype(np.float32)
    w = codes * q["scales"].astype(np.float32)[:, None] + q["biases"].astype(np.float32)[:, None]
    return w.reshape(shape)


def encode(weights: dict[str, np.ndarray], base: dict[str, np.ndarray], bits: int,
           group_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) coding ``weights`` as a delta against ``base`` (same
    names and shapes). meta: bits, group size, each coded tensor's shape and
    how it is stored ("delta", "full" or "same")."""
    if set(weights) != set(base):
        missing = sorted(set(weights) ^ set(base))[:3]
        raise CBDError(f"the anchor and its parent's Subset hold different tensors ({', '.join(missing)}, ...)")
    arrays, kinds = {}, {}
    for name in sorted(weights):
        w, b = np.asarray(weights[name], np.float32), np.asarray(base[name], np.float32)
        if w.shape != b.shape:
            raise CBDError(f"{name}: shape {w.shape} differs from the parent's Subset {b.shape}")
        if np.array_equal(w, b):
            kinds[name] = "same"
        elif w.ndim < 2 or w.shape[-1] % group_size:
            kinds[name] = "full"
            arrays[name] = w
        else:
            kinds[name] = "delta"
            for k, v in quantize(w - b, bits, group_size).items():
                arrays[f"{name}.{k}"] = v
    meta = {"bits": bits, "group_size": group_size, "kinds": kinds,
            "shapes": {k: list(np.shape(weights[k])) for k in kinds}}
    return arrays, meta


def decode(base: dict[str, np.ndarray], arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """The weights ``encode`` coded, rebuilt on ``base``."""
    bits, group = int(meta["bits"]), int(meta["group_size"])
    out = {}
    try:
        for name, kind in meta["kinds"].items():
            shape = tuple(meta["shapes"][name])
            if kind == "same":
                out[name] = np.asarray(base[name], np.float32)
            elif kind == "full":
                out[name] = np.asarray(arrays[name], np.float32).reshape(shape)
            else:
                q = {k: np.asarray(arrays[f"{name}.{k}"]) for k in ("codes", "scales", "biases")}
                out[name] = np.asarray(base[name], np.float32) + dequantize(q, shape, bits, group)
    except (KeyError, ValueError, TypeError) as e:
        raise CBDError(f"the delta file is damaged or does not fit its parent ({e}); re-download the chain") from None
    return out


def bits_per_weight(arrays: dict[str, np.ndarray], meta: dict) -> float:
    """Stored bits per weight of the coded tensors (delta + full)."""
    n = sum(int(np.prod(meta["shapes"][k])) for k, kind in meta["kinds"].items() if kind != "same")
    return 8 * sum(a.nbytes for a in arrays.values()) / max(n, 1)
