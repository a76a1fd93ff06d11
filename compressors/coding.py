"""Huffman coding of quantization codes (Deep Compression's last stage).

The packer calls :func:`huffman_bytes` for the exact encoded size of a layer's codes
(``policy.coding == "huffman"``) and :func:`encode_tensor` / :func:`decode_tensor` to
write and read them. The blob from :func:`encode_tensor` is self-describing:

    uint32 n (number of codes) | int32 min_symbol | uint16 K (alphabet span) |
    K bytes: canonical code length of symbol min_symbol + i (0 = unused) | bitstream (MSB first)

so ``huffman_bytes(codes) == len(encode_tensor(codes))`` is the whole cost of the codes,
table included. Codebooks and scales are stored separately by the packer.

Example:
    >>> import torch
    >>> codes = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    >>> blob = encode_tensor(codes)
    >>> len(blob) == huffman_bytes(codes), decode_tensor(blob, codes.shape).tolist() == codes.tolist()
    (True, True)
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

_HEADER = struct.Struct("<IiH")


def code_lengths(freqs: dict[int, int]) -> dict[int, int]:
    """Huffman code length per symbol (a lone symbol gets length 1)."""
    if not freqs:
        return {}
    if len(freqs) == 1:
        return {next(iter(freqs)): 1}
    # (weight, tiebreak, symbols-in-subtree); lengths grow by one at every merge.
    heap = [(f, i, [s]) for i, (s, f) in enumerate(sorted(freqs.items()))]
    heapq.heapify(heap)
    lengths = dict.fromkeys(freqs, 0)
    tie = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes ``symbol -> (code value, length)`` from code lengths."""
    code, prev_len, out = 0, 0, {}
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev_len
        out[s] = (code, n)
        code += 1
        prev_len = n
    return out


def _pack(symbols: np.ndarray, table: dict[int, tuple[int, int]]) -> bytes:
    if symbols.size == 0:
        return b""
    syms = np.array(sorted(table), dtype=np.int64)
    vals = np.array([table[s][0] for s in syms], dtype=np.int64)
    lens = np.array([table[s][1] for s in syms], dtype=np.int64)
    pos = np.searchsorted(syms, symbols)
    v, ln = vals[pos], lens[pos]
    maxlen = int(lens.max())
    j = np.arange(maxlen)
    bits = (v[:, None] >> np.maximum(ln[:, None] - 1 - j, 0)) & 1
    return np.packbits(bits[j[None, :] < ln[:, None]].astype(np.uint8)).tobytes()


def huffman_code(symbols: Iterable[int]) -> tuple[dict[int, str], bytes]:
    """Huffman-code ``symbols``.

    Returns:
        ``(codebook, bitstream)``: ``codebook`` maps each symbol to its bit string
        (``"010"``), ``bitstream`` is the concatenation, packed MSB first, zero-padded.

    Example:
        >>> book, bits = huffman_code([5, 5, 5, 7])
        >>> huffman_decode(book, bits, 4)
        [5, 5, 5, 7]
    """
    arr = np.asarray(list(symbols) if not isinstance(symbols, np.ndarray) else symbols, dtype=np.int64).ravel()
    table = canonical_codes(code_lengths(dict(Counter(arr.tolist()))))
    book = {s: format(c, f"0{n}b") for s, (c, n) in table.items()}
    return book, _pack(arr, table)


def huffman_decode(codebook: dict[int, str], bitstream: bytes, n: int) -> list[int]:
    """Decode ``n`` symbols from ``bitstream`` with the ``codebook`` of :func:`huffman_code`."""
    rev = {c: s for s, c in codebook.items()}
    bits = np.unpackbits(np.frombuffer(bitstream, dtype=np.uint8)).tolist()
    out, cur = [], ""
    for b in bits:
        if len(out) == n:
            break
        cur += "1" if b else "0"
        s = rev.get(cur)
        if s is not None:
            out.append(s)
            cur = ""
    if len(out) != n:
        raise ValueError(f"`bitstream holds {n} symbols` must hold, but got {len(out)} symbols")
    return out


def _as_array(codes: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        return codes.detach().cpu().reshape(-1).to(torch.int64).numpy()
    return np.asarray(codes, dtype=np.int64).ravel()


def huffman_bytes(codes: torch.Tensor | np.ndarray | Sequence[int]) -> int:
    """Exact size in bytes of :func:`encode_tensor` ``(codes)``: header + length table + bitstream.

    Computed from symbol counts only (fast: no bit packing).

    Example:
        >>> huffman_bytes(torch.zeros(800, dtype=torch.int8))  # 10 header, 1 table, 800 bits
        111
    """
    arr = _as_array(codes)
    if arr.size == 0:
        return _HEADER.size
    syms, counts = np.unique(arr, return_counts=True)
    lengths = code_lengths(dict(zip(syms.tolist(), counts.tolist())))
    total_bits = sum(int(c) * lengths[int(s)] for s, c in zip(syms, counts))
    span = int(syms[-1] - syms[0] + 1)
    return _HEADER.size + span + math.ceil(total_bits / 8)


def fixed_width_bytes(codes: torch.Tensor | np.ndarray | Sequence[int], bits: int) -> int:
    """Bytes of the same codes stored at ``bits`` each (the baseline Huffman is compared with)."""
    return math.ceil(_as_array(codes).size * bits / 8)


def encode_tensor(codes: torch.Tensor | np.ndarray | Sequence[int]) -> bytes:
    """Self-describing Huffman blob of integer ``codes`` (see module docstring for the layout)."""
    arr = _as_array(codes)
    if arr.size == 0:
        return _HEADER.pack(0, 0, 0)
    syms, counts = np.unique(arr, return_counts=True)
    lengths = code_lengths(dict(zip(syms.tolist(), counts.tolist())))
    lo, span = int(syms[0]), int(syms[-1] - syms[0] + 1)
    if span > 65535 or max(lengths.values()) > 255:
        raise ValueError(f"`alphabet span <= 65535` must hold, but got span={span}")
    table = bytes(lengths.get(lo + i, 0) for i in range(span))
    return _HEADER.pack(arr.size, lo, span) + table + _pack(arr, canonical_codes(lengths))


def decode_tensor(blob: bytes, shape: Sequence[int] | torch.Size | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; returns int64 codes (reshaped to ``shape`` if given)."""
    n, lo, span = _HEADER.unpack_from(blob)
    lengths = {lo + i: blob[_HEADER.size + i] for i in range(span) if blob[_HEADER.size + i]}
    table = canonical_codes(lengths)
    book = {s: format(c, f"0{ln}b") for s, (c, ln) in table.items()}
    out = torch.tensor(huffman_decode(book, blob[_HEADER.size + span:], n) if n else [], dtype=torch.int64)
    return out.reshape(tuple(shape)) if shape is not None else out


# --- relative indices of a sparse layer's non-zeros (Deep Compression, Han et al. 2016, §3) ---

#: Gap caps tried per tensor; the encoder keeps the one with the smallest blob.
RELATIVE_INDEX_CAPS = (3, 7, 15, 31, 63)


def relative_index_symbols(keep: np.ndarray, cap: int) -> np.ndarray:
    """The gap symbols of the kept positions of a flat mask ``keep``.

    Each kept position is written as the number of dropped positions before it (since the
    previous kept one); a gap of ``cap`` or more first emits the escape symbol ``cap``
    ("skip ``cap`` positions, no weight here") as often as needed, like Han et al.'s filler
    zeros but without storing a weight for it.

    Example:
        >>> relative_index_symbols(np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 1], bool), cap=3).tolist()
        [0, 2, 3, 2]
    """
    pos = np.flatnonzero(np.asarray(keep, dtype=bool).ravel())
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    n_esc = gaps // cap
    out = np.full(int(n_esc.sum()) + gaps.size, cap, dtype=np.int64)
    out[np.cumsum(n_esc + 1) - 1] = gaps % cap
    return out


def encode_positions(keep: np.ndarray) -> bytes:
    """Huffman-coded relative indices of a flat mask: ``uint8 cap`` + :func:`encode_tensor` of the gaps.

    Replaces the 1-bit-per-weight bitmap of a sparse layer when a policy asks for Huffman
    coding: at 85% sparsity the gaps cost ~4 bits per kept weight instead of ~6.7. Where the
    bitmap is smaller (dense masks, above ~35% kept) it is written instead, after a 0 byte.

    Example:
        >>> keep = np.random.default_rng(0).random(1000) < 0.15
        >>> blob = encode_positions(keep)
        >>> bool((decode_positions(blob, keep.size) == keep).all()), len(blob) < (keep.size + 7) // 8
        (True, True)
    """
    keep = np.asarray(keep, dtype=bool).ravel()
    sized = []
    for cap in RELATIVE_INDEX_CAPS:
        sym = relative_index_symbols(keep, cap)
        sized.append((huffman_bytes(sym), cap, sym))
    size, cap, sym = min(sized, key=lambda t: t[:2])  # the smallest blob; ties: the smaller cap
    if size >= (keep.size + 7) // 8:
        return b"\x00" + np.packbits(keep.astype(np.uint8), bitorder="little").tobytes()
    return bytes([cap]) + encode_tensor(sym)


def decode_positions(blob: bytes, numel: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`: the flat boolean mask of ``numel`` positions."""
    cap = blob[0]
    if cap == 0:
        return np.unpackbits(np.frombuffer(blob[1:], dtype=np.uint8), bitorder="little")[:numel].astype(bool)
    keep = np.zeros(numel, dtype=bool)
    pos = 0
    for s in decode_tensor(blob[1:]).tolist():
        if s == cap:
            pos += cap
        else:
            pos += s
            keep[pos] = True
            pos += 1
    return keep


def relative_index_estimate(numel: int, nnz: int) -> int:
    """Expected bytes of :func:`encode_positions` for ``nnz`` kept of ``numel`` positions at random.

    Gaps of independently kept positions are geometric with ``p = nnz / numel``: a gap's
    remainder ``r < cap`` has weight ``(1-p)**r`` and each kept weight carries on average
    ``q / (1 - q)`` escapes, ``q = (1-p)**cap``. The Huffman code is built on these expected
    counts (the size model's estimate; the packer's exact figure comes from the real mask).
    """
    bitmap = 1 + (numel + 7) // 8
    if nnz <= 0:
        return min(bitmap, 1 + _HEADER.size)
    if nnz >= numel:
        return bitmap
    p = nnz / numel
    best = bitmap
    for cap in RELATIVE_INDEX_CAPS:
        q = (1 - p) ** cap
        w = np.array([(1 - p) ** r * p / (1 - q) for r in range(cap)] + [q / (1 - q)]) * nnz
        freqs = {s: max(1, int(round(c))) for s, c in enumerate(w)}
        lengths = code_lengths(freqs)
        bits = sum(w[s] * lengths[s] for s in freqs)
        size = 1 + _HEADER.size + (cap + 1) + math.ceil(bits / 8)
        best = min(best, size)
    return int(best)
