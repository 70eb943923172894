"""One strict parse of a zip checkpoint: the member table that scanning and loading share.

Python's zipfile and torch's reader (miniz) disagree on odd archives: zipfile adjusts offsets
for data prepended to the archive, miniz matches names case-insensitively, either may pick a
different copy of a duplicate name. So the archive is parsed once, here, and refused unless
every parser must read it the same way: one end-of-central-directory record at the end, no
prepended data, a central directory that matches the local headers, members laid end to end,
no duplicate or case-colliding names, no encryption, no multi-disk spanning, only stored or
deflated members, and no member inflating beyond ``MAX_INFLATE_RATIO`` (torch writes every
member stored, so a compressed one is already unusual). Reading the table is O(members).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ckpt_doctor.errors import UnreadableError

MAX_INFLATE_RATIO = 10
MAX_DIRECTORY_BYTES = 64 << 20  # ~600k members; a torch checkpoint has one per storage
_EOCD = struct.Struct("<4s4H2LH")  # sig, disk, cd disk, entries here, entries, cd size, cd off
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # sig, disk of eocd64, its offset, total disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # sig, size, versions, disks, entries x2, cd size/off
_CENTRAL = struct.Struct("<4s4H2H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_MAX_COMMENT = 0xFFFF
_STORED, _DEFLATED = 0, 8
_FLAG_ENCRYPTED, _FLAG_DESCRIPTOR, _FLAG_STRONG, _FLAG_UTF8 = 0x1, 0x8, 0x40, 0x800
_HINT = "re-download or re-save the checkpoint; torch.save writes plain zip archives"


@dataclass(frozen=True)
class Member:
    name: str
    data_start: int  # file offset of the member's (possibly compressed) bytes
    compressed_size: int
    size: int
    method: int
    crc: int


@dataclass(frozen=True)
class ZipTable:
    path: Path
    file_size: int
    members: dict[str, Member]  # in central-directory order
    root: str  # torch's archive name: the first member's top folder, with its "/"

    def read(self, member: Member) -> bytes:
        """A member's bytes (inflated, CRC-checked): for the pickles, never the storages."""
        with _File(self.path) as f:
            raw = f[member.data_start : member.data_start + member.compressed_size]
        if member.method == _DEFLATED:
            inflater = zlib.decompressobj(-15)
            try:
                data = inflater.decompress(raw, member.size + 1)
            except zlib.error as exc:
                raise self._bad(f"member {member.name!r} does not inflate ({exc})") from exc
        else:
            data = raw
        if len(data) != member.size:
            raise self._bad(f"member {member.name!r} is not the {member.size} bytes it declares")
        if zlib.crc32(data) != member.crc:
            raise self._bad(f"member {member.name!r} fails its CRC check")
        return data

    def _bad(self, what: str) -> UnreadableError:
        return UnreadableError(f"{self.path}: corrupt zip checkpoint: {what}", hint=_HINT)


class _File:
    """The file read with pread: slices are bytes, short at the end; nothing is mapped, so
    parsing touches only the few hundred bytes per member it reads."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s: slice) -> bytes:
        start = max(0, s.start or 0)
        stop = min(self.size, self.size if s.stop is None else s.stop)
        return os.pread(self.fd, stop - start, start) if stop > start else b""

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def _unpack(fmt: struct.Struct, buf: _File | bytes, at: int) -> tuple:
    raw = buf[at : at + fmt.size]
    if len(raw) != fmt.size:
        raise struct.error("short read")
    return fmt.unpack(raw)


def read_table(path: Path) -> ZipTable:
    """Parse the archive's tables or raise UnreadableError."""

    def bad(what: str) -> UnreadableError:
        return UnreadableError(f"{path}: corrupt or unusual zip checkpoint: {what}", hint=_HINT)

    with _File(path) as f:
        try:
            return _read_table(path, f, bad)
        except struct.error as exc:
            raise bad("a record runs past the end of the file (truncated?)") from exc


def _read_table(path: Path, buf: _File, bad) -> ZipTable:
    size = len(buf)
    eocd = _find_eocd(buf, bad)
    _sig, disk, cd_disk, here, entries, cd_size, cd_offset, comment_len = _unpack(_EOCD, buf, eocd)
    if eocd + _EOCD.size + comment_len != size:
        raise bad("the end-of-archive record does not end the file")
    if disk or cd_disk or here != entries:
        raise bad("a multi-disk (spanned) archive")
    cd_end = eocd
    if eocd >= _EOCD64_LOCATOR.size and bytes(buf[eocd - 20 : eocd - 16]) == b"PK\x06\x07":
        _sig, disk64, eocd64, disks = _unpack(_EOCD64_LOCATOR, buf, eocd - 20)
        if disk64 or disks != 1:
            raise bad("a multi-disk (spanned) archive")
        if eocd64 + _EOCD64.size > eocd - 20 or bytes(buf[eocd64 : eocd64 + 4]) != b"PK\x06\x06":
            raise bad("a broken zip64 end-of-archive record")
        fields = _unpack(_EOCD64, buf, eocd64)
        record_size, (d1, d2) = fields[1], fields[4:6]
        here, entries, cd_size, cd_offset = fields[6:]
        if d1 or d2 or here != entries:
            raise bad("a multi-disk (spanned) archive")
        if eocd64 + 12 + record_size != eocd - 20:
            raise bad("a broken zip64 end-of-archive record")
        cd_end = eocd64
    if cd_offset + cd_size != cd_end:
        raise bad("data before or inside the central directory (two archives in one file?)")
    if entries > cd_size // _CENTRAL.size:
        raise bad(f"{entries} entries cannot fit a {cd_size}-byte central directory")
    if cd_size > MAX_DIRECTORY_BYTES:
        raise bad(f"a central directory of {cd_size} bytes")
    directory = buf[cd_offset:cd_end]  # one read; offsets below are relative to it
    members = _central_directory(directory, 0, cd_size, entries, bad)
    _check_local_headers(buf, members, cd_offset, bad)
    if not members:
        raise bad("the archive has no members")
    first = next(iter(members))
    root = first.split("/", 1)[0] + "/" if "/" in first else ""
    for m in members.values():
        ratio_ok = m.size <= MAX_INFLATE_RATIO * max(m.compressed_size, 1)
        if m.method == _DEFLATED and not ratio_ok:
            raise bad(f"member {m.name!r} would inflate {m.compressed_size} bytes to {m.size}")
        if m.method == _STORED and m.size != m.compressed_size:
            raise bad(f"stored member {m.name!r} has two different sizes")
    return ZipTable(path, size, members, root)


def _find_eocd(buf: _File, bad) -> int:
    size = len(buf)
    start = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = bytes(buf[start:])
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise bad("no end-of-archive record (truncated?)")
    # A second record in the comment would make another parser's view of the file differ.
    if tail.find(b"PK\x05\x06", at + 1) >= 0:
        raise bad("more than one end-of-archive record")
    return start + at


def _central_directory(buf, offset: int, end: int, entries: int, bad) -> dict[str, Member]:
    members: dict[str, Member] = {}
    folded: set[str] = set()
    pos = offset
    for _ in range(entries):
        if pos + _CENTRAL.size > end or bytes(buf[pos : pos + 4]) != b"PK\x01\x02":
            raise bad("a broken central directory entry")
        f = _unpack(_CENTRAL, buf, pos)
        flags, method, crc, csize, usize = f[3], f[4], f[7], f[8], f[9]
        name_len, extra_len, comment_len, disk_start = f[10], f[11], f[12], f[13]
        local = f[16]
        name_end = pos + _CENTRAL.size + name_len
        extra_end = name_end + extra_len
        if extra_end + comment_len > end:
            raise bad("a central directory entry runs past the directory")
        raw_name = bytes(buf[pos + _CENTRAL.size : name_end])
        name = raw_name.decode("utf-8" if flags & _FLAG_UTF8 else "cp437", "replace")
        if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG):
            raise bad(f"member {name!r} is encrypted")
        if disk_start:
            raise bad("a multi-disk (spanned) archive")
        if method not in (_STORED, _DEFLATED):
            raise bad(f"member {name!r} uses compression method {method}")
        usize, csize, local = _zip64(bytes(buf[name_end:extra_end]), usize, csize, local, bad)
        if name in members:
            raise bad(f"member {name!r} appears twice")
        if name.lower() in folded:
            raise bad(f"member {name!r} differs from another only in letter case")
        folded.add(name.lower())
        members[name] = Member(name, local, csize, usize, method, crc)  # local: header offset
        pos = extra_end + comment_len
    if pos != end:
        raise bad("the central directory holds more than its entries")
    return members


def _zip64(extra: bytes, usize: int, csize: int, local: int, bad) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field where the 32-bit fields say 0xFFFFFFFF."""
    wanted = [v == 0xFFFFFFFF for v in (usize, csize, local)]
    if not any(wanted):
        return usize, csize, local
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            out = [usize, csize, local]
            for i, need in enumerate(wanted):
                if need:
                    if not values:
                        raise bad("a zip64 field is missing")
                    out[i] = values.pop(0)
            return out[0], out[1], out[2]
        pos += 4 + length
    raise bad("a zip64 field is missing")


def _check_local_headers(buf, members: dict[str, Member], cd_offset: int, bad) -> None:
    """Each local header agrees with its central entry, and members lie end to end from byte 0
    to the central directory: no gap where a second archive could hide."""
    expected = 0
    for name, m in list(members.items()):
        pos = m.data_start  # still the local header offset here
        if pos != expected or pos + _LOCAL.size > cd_offset:
            raise bad(f"member {name!r} is not where the previous one ends")
        f = _unpack(_LOCAL, buf, pos)
        if f[0] != b"PK\x03\x04":
            raise bad(f"member {name!r} has no local header")
        flags, method, name_len, extra_len = f[2], f[3], f[9], f[10]
        start = pos + _LOCAL.size + name_len + extra_len
        local_name = bytes(buf[pos + _LOCAL.size : pos + _LOCAL.size + name_len])
        decoded = local_name.decode("utf-8" if flags & _FLAG_UTF8 else "cp437", "replace")
        if decoded != name or method != m.method or flags & (_FLAG_ENCRYPTED | _FLAG_STRONG):
            raise bad(f"member {name!r}: local header and central directory disagree")
        end = start + m.compressed_size
        if end > cd_offset:
            raise bad(f"member {name!r} runs into the central directory")
        if flags & _FLAG_DESCRIPTOR:
            end += _descriptor_length(buf, end, cd_offset, m, bad)
        members[name] = Member(name, start, m.compressed_size, m.size, m.method, m.crc)
        expected = end
    if expected != cd_offset:
        raise bad("bytes between the last member and the central directory")


def _descriptor_length(buf, pos: int, limit: int, m: Member, bad) -> int:
    """Length of the data descriptor after a member (signature optional, 32 or 64-bit)."""
    signed = bytes(buf[pos : pos + 4]) == b"PK\x07\x08"
    base = 4 if signed else 0
    for width, fmt in ((4, "<3L"), (8, "<L2Q")):
        length = base + 4 + 2 * width
        if pos + length <= limit:
            crc, csize, usize = struct.unpack(fmt, buf[pos + base : pos + length])
            if (crc, csize, usize) == (m.crc, m.compressed_size, m.size):
                return length
    raise bad(f"member {m.name!r}: its data descriptor disagrees with the central directory")
