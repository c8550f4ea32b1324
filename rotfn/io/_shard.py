"""safetensors files read and written one tensor at a time: headers, dtype names, a streaming writer.

A safetensors file is ``[u64 little-endian N][N bytes of JSON header][data]``; the header
maps each tensor name to ``{"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}``
(offsets into the data, which the tensors cover back to back) plus an optional
``"__metadata__"`` of strings, padded with spaces to a multiple of 8 bytes.
:func:`safetensors.torch.save_file` needs every tensor of a file in memory at once;
:class:`ShardWriter` writes the header first (the layout is known from names, dtypes
and shapes alone) and then each tensor's bytes as they are computed, in pieces if
need be, so a 5 GB shard never has to be held.

References:
    safetensors format: https://github.com/huggingface/safetensors (README, "Format").
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading

import torch

from rotfn.errors import CheckpointError, message

__all__ = ["ST_DTYPES", "ShardWriter", "TensorEntry", "header_bytes", "read_header"]

#: safetensors dtype names of the torch dtypes they store.
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the limit the safetensors readers enforce


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: name, dtype, shape and its byte range in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of its data: ``numel * itemsize``."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of dim 0 (0 for a scalar or an empty tensor): where its row ``i`` starts, ``i * row_bytes``."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorEntry]]:
    """The length prefix and header of a file holding ``entries`` back to back, in that order.

    Args:
        entries: name, dtype and shape of each tensor (offsets are ignored and computed).
        metadata: the ``"__metadata__"`` strings, e.g. ``{"format": "pt"}``.

    Returns:
        ``(prefix, placed)``: the bytes before the data and the entries with their offsets.

    Raises:
        CheckpointError: a dtype safetensors cannot store.

    Example:
        >>> prefix, placed = header_bytes([TensorEntry("a", torch.bfloat16, (2, 3))], {"format": "pt"})
        >>> len(prefix) % 8, placed[0].end
        (0, 12)
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    placed, offset = [], 0
    for e in entries:
        name = _ST_NAMES.get(e.dtype)
        if name is None:
            raise CheckpointError(message("header_bytes", f"entries[{e.name!r}]", f"a dtype of {sorted(_ST_NAMES.values(), key=str)}",
                                          e.dtype, "cast the tensor to a stored dtype"))
        placed.append(dataclasses.replace(e, begin=offset, end=offset + e.nbytes))
        header[e.name] = {"dtype": name, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text, placed


def read_header(path: str, *, fn: str = "read_header") -> tuple[list[TensorEntry], dict[str, str], int]:
    """The tensors of a safetensors file (in data order), its metadata and the size it must have.

    Args:
        path: a safetensors file.
        fn: the public function to name in an error.

    Returns:
        ``(entries, metadata, size)``: entries sorted by offset, with offsets from the start of the
        file; ``size`` = header plus data bytes.

    Raises:
        CheckpointError: not a safetensors file, a damaged header, a dtype torch lacks, or a
            file shorter than its header says ("the file is truncated or not a safetensors file
            (header says N bytes, file has M)").

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/a.safetensors"
        >>> safetensors.torch.save_file({"w": torch.zeros(2, 2)}, path)
        >>> [(e.name, e.dtype, e.shape) for e in read_header(path)[0]]
        [('w', torch.float32, (2, 2))]
    """
    def bad(expected: str, got) -> CheckpointError:
        return CheckpointError(message(fn, "path", f"{path}: {expected}", got, "download or write the file again"))

    def short(says: int) -> CheckpointError:  # the first 8 bytes promise more than the file has
        return bad("a complete safetensors file", f"the file is truncated or not a safetensors file (header says "
                                                  f"{says} bytes, file has {size})")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad("a safetensors file (8-byte header length first)",
                      f"{size} bytes: the file is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER:
            raise bad(f"a header length below {_MAX_HEADER}", f"{n}: not a safetensors file")
        if n > size - 8:
            raise short(8 + n)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad("a JSON header", f"{type(err).__name__} ({err})") from None
    if not isinstance(header, dict):
        raise bad("a JSON object header", type(header).__name__)
    metadata = header.pop("__metadata__", None) or {}
    entries, start = [], 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = ST_DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"a known dtype, a shape and data_offsets for tensor {name!r}", repr(info)[:120]) from None
        entry = TensorEntry(name, dtype, shape, start + begin, start + end)
        if end - begin != entry.nbytes or begin < 0:
            raise bad(f"{entry.nbytes} bytes for tensor {name!r} {list(shape)}", f"offsets {[begin, end]}")
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    total = start + (entries[-1].end - start if entries else 0)
    if size < total:
        raise short(total)
    return entries, metadata, total


class ShardWriter:
    """Write a safetensors file whose layout is known up front, tensor by tensor, piece by piece.

    The header goes out first; :meth:`write` then takes the bytes of the tensors in
    the order of ``entries`` (a tensor may come in several contiguous pieces along
    dim 0), or :meth:`write_at` puts a piece at its place, from any thread and in any
    order; :meth:`close` checks that every byte arrived and fsyncs.

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/a.safetensors"
        >>> w = ShardWriter(path, [TensorEntry("w", torch.float32, (4, 2))], {"format": "pt"})
        >>> w.write_at(24, torch.ones(1, 2)), w.write(torch.zeros(3, 2))
        (8, 24)
        >>> w.close()
        >>> safetensors.torch.load_file(path)["w"][:, 0].tolist()
        [0.0, 0.0, 0.0, 1.0]
    """

    def __init__(self, path: str, entries: list[TensorEntry], metadata: dict[str, str] | None = None):
        prefix, self.entries = header_bytes(entries, metadata)
        self.size = len(prefix) + (self.entries[-1].end if self.entries else 0)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(prefix)
        self._file.flush()  # from here on every write is positional (os.pwrite)
        self._start = len(prefix)
        self._next = 0  # data offset of the next write()
        self._written = 0
        self._lock = threading.Lock()

    def write(self, piece: torch.Tensor) -> int:
        """Append ``piece`` (CPU, of the current tensor's dtype) after the last :meth:`write`; returns its byte count."""
        n = self.write_at(self._next, piece)
        self._next += n
        return n

    def write_at(self, offset: int, piece: torch.Tensor) -> int:
        """Write ``piece``'s bytes at ``offset`` of the data section (thread-safe); returns the byte count."""
        data = piece.contiguous().reshape(-1).view(torch.uint8)
        view, pos = memoryview(data.numpy()), self._start + offset
        if hasattr(os, "pwrite"):
            while view:
                n = os.pwrite(self._file.fileno(), view, pos)
                view, pos = view[n:], pos + n
        else:  # (Windows) one writer at a time, through the file position
            with self._lock:
                self._file.seek(pos)
                self._file.write(view)
                self._file.flush()
        with self._lock:
            self._written += data.numel()
        return data.numel()

    def close(self) -> None:
        """Check the byte count, flush and fsync, close.

        Raises:
            CheckpointError: fewer or more bytes were written than the header announced.
        """
        try:
            expected = self.entries[-1].end if self.entries else 0
            if self._written != expected:
                raise CheckpointError(message("ShardWriter.close", "write", f"{expected} data bytes",
                                              self._written, "write every tensor of the header in order"))
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without checks (the caller discards the file)."""
        self._file.close()
