"""Sequential aligned file I/O: the same bytes with O_DIRECT, buffered, or falling back mid-file."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from loramerge.formats import directio
from loramerge.formats.directio import ALIGN, BufferPool, SequentialWriter, read_blocks

BLOCK = 2 * ALIGN
# around every boundary that matters: empty, below/at/above the alignment and the block
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def _payload(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)


@pytest.fixture(params=["direct", "buffered"])
def direct(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param == "buffered":
        monkeypatch.setenv("LORAMERGE_DIRECT_IO", "0")
    return bool(request.param == "direct")


@pytest.mark.parametrize("size", SIZES)
def test_writer_and_reader_round_trip(tmp_path: Path, size: int, direct: bool) -> None:
    parts = [_payload(size, 0), _payload(size // 3 + 5, 1)]
    path = tmp_path / "f.bin"
    writer = SequentialWriter(path, block=BLOCK)
    if not direct:
        assert not writer.direct
    for part in parts:
        writer.write(part)
    writer.close()
    expected = torch.cat(parts).numpy().tobytes()
    assert path.read_bytes() == expected  # also the size: an O_DIRECT tail is padded, then truncated
    pieces = [(offset, bytes(block.numpy())) for offset, block in read_blocks(path, block=BLOCK)]
    assert [o for o, _ in pieces] == list(range(0, len(expected), BLOCK))
    assert b"".join(p for _, p in pieces) == expected


def test_copy_from_hashes_what_it_writes(tmp_path: Path, direct: bool) -> None:
    source = tmp_path / "src.bin"
    data = _payload(5 * BLOCK + 123, 2)
    source.write_bytes(data.numpy().tobytes())
    hasher = hashlib.sha256()
    writer = SequentialWriter(tmp_path / "dst.bin", block=BLOCK)
    writer.write(data[:10])  # unaligned start, as after a safetensors header
    fd = os.open(source, os.O_RDONLY)
    try:
        writer.copy_from(fd, 777, data.numel() - 777, hasher.update)
        with pytest.raises(EOFError, match="ends"):
            writer.copy_from(fd, data.numel() - 5, 10)
    finally:
        os.close(fd)
    writer.abort()
    copied = data[777:].numpy().tobytes()
    assert hasher.hexdigest() == hashlib.sha256(copied).hexdigest()


def test_falls_back_when_the_filesystem_refuses_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that accepts O_DIRECT at open but refuses the I/O (EINVAL): the writer and the
    reader go on buffered, with the same bytes."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS")
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def is_direct(fd: int) -> bool:
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)
    data = _payload(3 * BLOCK + 5, 3)
    writer = SequentialWriter(tmp_path / "f.bin", block=BLOCK)
    writer.write(data)
    writer.close()
    assert not writer.direct
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()
    assert b"".join(bytes(b.numpy()) for _, b in read_blocks(tmp_path / "f.bin", block=BLOCK)) == data.numpy().tobytes()


def test_write_errors_surface_and_close_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: torch.Tensor, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(directio, "pwrite_all", full)
    writer = SequentialWriter(tmp_path / "f.bin", block=BLOCK)
    with pytest.raises(OSError) as info:
        writer.write(_payload(3 * BLOCK, 4))  # the first full block's error shows when the second is full
    assert info.value.errno == errno.ENOSPC
    writer.abort()
    assert writer.fd == -1


def test_unaligned_block_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        SequentialWriter(tmp_path / "f.bin", block=1000)
    with pytest.raises(ValueError, match="multiple of 4096"):
        next(read_blocks(tmp_path / "f.bin", block=1000))


def test_buffer_pool_reuses_and_bounds() -> None:
    pool = BufferPool(2)
    a = pool.take(100)
    b = pool.take(10)
    pool.give(a)
    assert pool.take(50).data_ptr() == a.data_ptr()  # the smallest free buffer that fits is reused
    pool.give(b)
    big = pool.take(1000)  # nothing free fits: the small one is replaced
    assert big.numel() >= 1000 and big.data_ptr() != b.data_ptr()
    import threading

    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(1)))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # both lent out: take() waits
    pool.give(big)
    waiter.join(timeout=5)
    assert got and got[0].data_ptr() == big.data_ptr()
