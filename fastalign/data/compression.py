"""Compressed data files, opened as streams of decompressed bytes (nothing is written to disk).

The compression is named by the file's last suffix: `.gz` (gzip), `.bz2`, `.xz` (lzma) from the
standard library, `.zst` through the `zstandard` package (the standard library has no zstd before
Python 3.14). The suffix before it names the content: `pairs.jsonl.gz` is gzip-compressed JSONL.

A corrupt or truncated stream surfaces while it is read, as OSError / EOFError / lzma.LZMAError
(`STREAM_ERRORS`); the readers turn those into a ValueError naming the file and the last line read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path
from typing import BinaryIO

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
STREAM_ERRORS = (OSError, EOFError, lzma.LZMAError)
_ZSTD_CHUNK = 1 << 16  # compressed bytes per read from disk
_ZSTD_SLICE = 1 << 12  # compressed bytes per decompression step (see _ZstdReader)


def split_compression(name: str) -> tuple[str, str | None]:
    """(name without the compression suffix, compression or None): "a.jsonl.gz" -> ("a.jsonl", "gzip")."""
    for suffix, compression in COMPRESSIONS.items():
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], compression
    return name, None


def open_binary(path: Path, compression: str | None) -> BinaryIO:
    """`path` opened for reading bytes, decompressed on the fly when `compression` is set."""
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(_zstandard(path), open(path, "rb")))
    raise ValueError(f"unknown compression {compression!r}")


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise ValueError(
            f"{path}: reading .zst files needs the 'zstandard' package (pip install zstandard), "
            "or decompress the file first (zstd -d)"
        ) from None
    return zstandard


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd file frame by frame. zstandard's own `stream_reader` and `read_to_iter`
    end silently on a truncated file; this reader raises EOFError when the input ends inside a
    frame, as gzip, bz2 and lzma do. zstandard's decompressobj cannot cap its output, so input is
    fed `_ZSTD_SLICE` bytes at a time: memory per step is that slice times the compression ratio."""

    def __init__(self, zstandard, raw: BinaryIO) -> None:
        self._zstd, self._raw = zstandard, raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read; None between frames
        self._input = b""  # compressed bytes read but not yet decompressed
        self._pending = b""  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if not self._input:
                self._input = self._raw.read(_ZSTD_CHUNK)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("zstd data ended inside a frame (truncated file?)")
                    return 0
            piece, self._input = self._input[:_ZSTD_SLICE], self._input[_ZSTD_SLICE:]
            self._decompress(piece)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, piece: bytes) -> None:
        try:
            while piece:  # a piece may end one frame and start the next (concatenated .zst files)
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                self._pending += self._frame.decompress(piece)
                piece = b""
                if self._frame.eof:
                    piece, self._frame = self._frame.unused_data, None
        except self._zstd.ZstdError as e:
            raise OSError(f"zstd: {e}") from e

    def close(self) -> None:
        self._raw.close()
        super().close()
