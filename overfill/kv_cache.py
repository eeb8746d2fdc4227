"""The static KV cache that the full model fills and the decoder extends."""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers `[B, H_kv, S_max, D]` plus a slot-validity mask.

    Slots are columns of the left-padded batch: prompt token j of every row sits in
    slot j, and decode step i writes slot `prompt_len + i` for every row at once.
    `valid[b, s]` says whether slot s of row b holds a real token (padding does not).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # [B, S_max]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.k[0].shape)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v `[B, H_kv, T, D]` at `slots` `[T]`; return the layer's first `kv_len` slots."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        if kv_len is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def select_layers(self, layer_map: list[int] | None) -> "KVCache":
        """The hand-off: a view whose layer i is this cache's layer `layer_map[i]`.

        No copy: the decoder writes into the very buffers the full model filled, so a
        later refresh by the full model is seen by the decoder too.
        """
        if layer_map is None:
            return self
        return self._view([self.k[j] for j in layer_map], [self.v[j] for j in layer_map], self.valid)

    def _view(self, k: list[Tensor], v: list[Tensor], valid: Tensor) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.valid = k, v, valid
        return view

    def first_slots(self, n: int) -> "KVCache":
        """A view of slots 0..n-1 of every layer (no copy), e.g. the prompt part of a longer cache."""
        return self._view([k[:, :, :n] for k in self.k], [v[:, :, :n] for v in self.v], self.valid[:, :n])

    def first_rows(self, n: int) -> "KVCache":
        """A view of rows 0..n-1 (no copy): a step on it writes into this cache's buffers."""
        return self._view([k[:n] for k in self.k], [v[:n] for v in self.v], self.valid[:n])

    def take_rows(self, rows: Tensor, max_len: int | None = None) -> "KVCache":
        """A new cache whose row b is a copy of this cache's row `rows[b]`, with room for `max_len` slots.

        `rows` may repeat a row: several continuations read one prefilled context.
        """
        _, heads, length, head_dim = self.shape
        max_len = length if max_len is None else max_len
        if max_len < length:
            raise ValueError(f"max_len {max_len} is shorter than the cache's {length} slots")
        out = KVCache(len(self.k), rows.numel(), heads, max_len, head_dim, self.k[0].dtype, self.k[0].device)
        for dst, src in zip(out.k + out.v, self.k + self.v):
            dst[:, :, :length] = src[rows]  # [R, H_kv, S, D]
        out.valid[:, :length] = self.valid[rows]
        return out

    def grown(self, max_len: int) -> "KVCache":
        """A copy with `max_len` slots, the first `self.max_len` of them this cache's."""
        return self.take_rows(torch.arange(self.shape[0], device=self.valid.device), max_len)

    def write_rows(self, rows: slice, end: int, other: "KVCache", picks: Tensor) -> None:
        """Place rows `picks` of `other` (T slots each) into `rows`, ending at slot `end`; the rest of
        those rows becomes invalid."""
        T = other.max_len
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[rows, :, end - T:end] = src[picks]  # [k, H_kv, T, D]
        self.valid[rows] = False
        self.valid[rows, end - T:end] = other.valid[picks]

    def move_slots(self, rows: int, start: int, stop: int, to: int) -> None:
        """Move slots `[start, stop)` of rows 0..rows-1 to begin at slot `to`; every other slot of them
        becomes invalid (overlapping ranges are fine)."""
        width = stop - start
        src, dst = slice(start, stop), slice(to, to + width)
        for buf in self.k + self.v:
            buf[:rows, :, dst] = buf[:rows, :, src].clone()
        self.valid[:rows, dst] = self.valid[:rows, src].clone()
        self.valid[:rows, :to] = False
        self.valid[:rows, to + width:] = False

    def copy_row(self, src: int, dst: int, slots: int) -> None:
        """Copy the first `slots` slots of row `src` over row `dst`."""
        for buf in self.k + self.v:
            buf[dst, :, :slots] = buf[src, :, :slots]
        self.valid[dst, :slots] = self.valid[src, :slots]

    def copy_from(self, other: "KVCache") -> None:
        """Copy another cache of the same shape into this one (asserting the shapes match)."""
        assert len(other.k) == len(self.k), f"layers: {len(other.k)} != {len(self.k)}"
        assert other.shape == self.shape, f"shape: {other.shape} != {self.shape}"
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst.copy_(src)
        self.valid.copy_(other.valid)

    def bytes_per_token(self) -> int:
        """Bytes of K and V stored per token, over all layers (per batch row)."""
        _, h, _, d = self.shape
        return 2 * len(self.k) * h * d * self.k[0].element_size()
