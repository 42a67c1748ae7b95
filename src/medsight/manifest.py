"""Atomic, verified output folders (exports, stage 2's coded data): nothing half-written is ever read.

**Writing** (`staged_dir(final)`): every file goes into a hidden sibling folder `.<name>.staging-<pid>`;
weights are streamed to disk in safetensors format and hashed on the way (`StagedDir.write_safetensors`),
other files written through the helper are hashed as they are written, and files other libraries write into
the folder (Hugging Face configs, tokenizers, plots) are hashed once they are closed. `manifest.json`, listing
every file with its size, sha256 and sha256 per 64 MiB chunk, is written last.

**The swap**: only then does the new folder replace the old one. On Linux the two folders are exchanged
atomically with `renameat2(RENAME_EXCHANGE)` and the old one is deleted afterwards, so `<final>` is at every
moment either the complete old folder or the complete new one. Where that call is missing the swap is two
renames (`final` -> `.<name>.old-<pid>`, staging -> `final`); a kill between them leaves both complete
copies, and the next `recover(final)` (run by every loader) rolls forward to the complete new folder (it has
a manifest) or back to the old one. A kill at any earlier moment leaves `final` untouched (the old export
stays loadable); the staging folder is left behind and removed by the next write.

**Loading** (`verify_file`, `verify_folder`): each file the next stage reads is checked against the manifest
before use: a missing file, a wrong size (truncation) or a wrong chunk hash (a flipped byte) raises
ExportError naming the file. Chunks are hashed in parallel threads (hashlib releases the GIL), so verifying
costs a fraction of reading the file on a machine with several cores. A folder written before manifests
existed loads with one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from medsight.atomic import OutputError, describe_os_error
from medsight.faults import SimulatedKill, should_die_writing

log = logging.getLogger("medsight")

MANIFEST = "manifest.json"
CHUNK = 64 << 20  # bytes per chunk hash
FORMAT = 1

#: torch dtype -> safetensors dtype name (the format's spelling)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def _export_error(msg: str) -> Exception:
    from medsight.export import ExportError

    return ExportError(msg)


# ------------------------------------------------------------------------------------------- hashing
class _Hasher:
    """sha256 of a whole file and of each CHUNK-byte piece, fed in order. For large blocks the whole-file
    hash runs in a second thread while this one hashes the chunks (hashlib releases the GIL)."""

    def __init__(self) -> None:
        self.whole, self.chunk, self.chunks, self.size, self._in_chunk = hashlib.sha256(), hashlib.sha256(), [], 0, 0
        self._pool: Optional[ThreadPoolExecutor] = None

    def update(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        pending = None
        if len(mv) >= 1 << 20:
            self._pool = self._pool or ThreadPoolExecutor(1)
            pending = self._pool.submit(self.whole.update, mv)
        else:
            self.whole.update(mv)
        try:
            self._update_chunks(mv)
        finally:
            if pending is not None:
                pending.result()

    def _update_chunks(self, mv: memoryview) -> None:
        self.size += len(mv)
        while len(mv):
            take = min(len(mv), CHUNK - self._in_chunk)
            self.chunk.update(mv[:take])
            self._in_chunk += take
            mv = mv[take:]
            if self._in_chunk == CHUNK:
                self.chunks.append(self.chunk.hexdigest())
                self.chunk, self._in_chunk = hashlib.sha256(), 0

    def entry(self) -> dict[str, Any]:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        chunks = self.chunks + ([self.chunk.hexdigest()] if self._in_chunk or not self.chunks else [])
        return {"size": self.size, "sha256": self.whole.hexdigest(), "chunk_sha256": chunks}


class _HashingFile:
    """A binary file that hashes what is written to it."""

    def __init__(self, f: Any, hasher: _Hasher) -> None:
        self.f, self.hasher = f, hasher

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        return self.f.write(data)


def hash_file(path: Path) -> dict[str, Any]:
    """Manifest entry of a file already on disk (one read)."""
    h = _Hasher()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.entry()


# ------------------------------------------------------------------------------------------- writing
def write_safetensors(f: Any, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Stream `tensors` to the binary file `f` in the safetensors layout (8-byte little-endian header length,
    JSON header with dtype/shape/data_offsets, then the raw little-endian bytes in header order), one tensor at
    a time: no second copy of the weights in memory. Read back by `safetensors.torch.load_file`."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    items, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor '{name}': dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append(t)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for t in items:
        if t.numel():
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
            f.write(data.numpy().data)


class StagedDir:
    """The staging folder of `staged_dir`; files written through it are hashed while written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[_HashingFile]:
        """Write `rel` (a path inside the folder) through a hashing file object."""
        path = self.path / rel
        h = _Hasher()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                yield _HashingFile(f, h)
                if should_die_writing(path.name):
                    f.truncate(max(0, f.tell() // 2))
                    raise SimulatedKill(f"MEDSIGHT_FAULT: killed while writing {path}")
        except OSError as err:
            raise OutputError(describe_os_error(path, err)) from None
        self.entries[rel] = h.entry()

    def write_safetensors(self, rel: str, tensors: Mapping[str, torch.Tensor]) -> None:
        with self.open(rel) as f:
            write_safetensors(f, tensors)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def copy_from(self, src: Path, skip: tuple[str, ...] = ()) -> None:
        """Copy every file of folder `src` (except `skip` and its manifest), hashing while copying."""
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            if p.is_file() and rel not in skip and rel != MANIFEST:
                with open(p, "rb") as fin, self.open(rel) as fout:
                    while block := fin.read(8 << 20):
                        fout.write(block)

    def finish(self) -> dict[str, Any]:
        """Hash files written by others, then write manifest.json (last)."""
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel not in self.entries and rel != MANIFEST:
                self.entries[rel] = hash_file(p)
        manifest = {"format": FORMAT, "chunk_bytes": CHUNK, "files": dict(sorted(self.entries.items()))}
        with open(self.path / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return manifest


def write_manifest(folder: Path | str) -> dict[str, Any]:
    """Hash every file of `folder` and write its manifest.json (last): for a folder written in place by code
    that adds its own files (the official import); a folder without it loads with a warning."""
    return StagedDir(Path(folder)).finish()


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.name}.staging-{os.getpid()}")


def _leftovers(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.staging-*")) + sorted(final.parent.glob(f".{final.name}.old-*"))


@contextlib.contextmanager
def staged_dir(final: Path | str) -> Iterator[StagedDir]:
    """Build the folder `final` in a staging folder, then swap it into place (see the module docstring).
    An error removes the staging folder and leaves `final` as it was; a disk or permission error becomes
    one OutputError naming the path."""
    final = Path(final)
    recover(final)
    for old in _leftovers(final):  # what an earlier killed write left
        shutil.rmtree(old, ignore_errors=True)
    tmp = _staging(final)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OutputError(describe_os_error(final.parent, err)) from None
    staged = StagedDir(tmp)
    try:
        yield staged
        staged.finish()
        _swap(tmp, final)
    except SimulatedKill:
        raise  # a kill leaves the staging folder, as a real one would
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        path = getattr(err, "filename", None) or final
        raise OutputError(describe_os_error(path, err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _forget(final)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), exchange) == 0:
        return True
    return False


def _swap(tmp: Path, final: Path) -> None:
    if final.exists() and _renameat2_exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    if should_die_writing(f"{final.name}/swap"):
        raise SimulatedKill(f"MEDSIGHT_FAULT: killed between the two renames of {final}")
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path | str) -> None:
    """Finish or undo a swap a kill interrupted between its two renames (only then is `final` missing while a
    complete copy exists): a staging folder with a manifest (complete) rolls forward, else the old one back."""
    final = Path(final)
    if final.exists():
        return
    done = [p for p in final.parent.glob(f".{final.name}.staging-*") if (p / MANIFEST).is_file()]
    old = sorted(final.parent.glob(f".{final.name}.old-*"))
    pick = done[0] if done and old else (old[0] if old else None)
    if pick is not None:
        log.warning("%s: completing an interrupted swap from %s", final, pick.name)
        os.rename(pick, final)


# ------------------------------------------------------------------------------------------ verifying
_manifests: dict[str, Optional[dict[str, Any]]] = {}
_verified: set[tuple] = set()
_warned: set[str] = set()


def _forget(folder: Path) -> None:
    _manifests.pop(str(folder.resolve()), None)


def read_manifest(folder: Path | str) -> Optional[dict[str, Any]]:
    """The folder's manifest, or None (with one warning per folder) for a folder written before manifests."""
    folder = Path(folder)
    key = str(folder.resolve())
    path = folder / MANIFEST
    if not path.is_file():
        if key not in _warned:
            _warned.add(key)
            log.warning("%s has no %s (written before medsight verified its outputs): its files are loaded "
                        "unchecked", folder, MANIFEST)
        return None
    stat = path.stat()
    cached = _manifests.get(key)
    if cached is not None and cached.get("_stat") == (stat.st_mtime_ns, stat.st_size, stat.st_ino):
        return cached
    try:
        m = json.loads(path.read_text())
        files = m["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError) as err:
        raise _export_error(f"{path}: unreadable manifest ({type(err).__name__}); the folder cannot be "
                            "trusted: write it again") from None
    m["_stat"] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    _manifests[key] = m
    return m


def _check_chunk(path: Path, index: int, chunk_bytes: int, expected: str) -> Optional[int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(index * chunk_bytes)
        left = chunk_bytes
        while left and (block := f.read(min(left, 8 << 20))):
            h.update(block)
            left -= len(block)
    return None if h.hexdigest() == expected else index


def verify_file(folder: Path | str, rel: str, workers: Optional[int] = None) -> None:
    """Check file `rel` of `folder` against its manifest (size, then every chunk hash, in parallel); raise
    ExportError naming the file. No manifest: one warning per folder, no check. Verified files are
    remembered (by inode, size and mtime) for the rest of the process."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        return
    path = folder / rel
    entry = m["files"].get(rel)
    if entry is None:
        raise _export_error(f"{path}: not listed in {folder / MANIFEST} (a file added after the export was "
                            "written); refusing to load it")
    if not path.is_file():
        raise _export_error(f"{path}: missing (listed in {folder / MANIFEST}); the export is incomplete")
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, entry["sha256"])
    if key in _verified:
        return
    if st.st_size != entry["size"]:
        raise _export_error(f"{path}: {st.st_size} bytes, the manifest says {entry['size']} (truncated or "
                            "replaced); write the export again")
    chunk_bytes = int(m.get("chunk_bytes", CHUNK))
    chunks = entry["chunk_sha256"]
    # twice as many threads as cores: while some wait for the disk, the others hash (I/O and sha256 overlap)
    n = workers or min(len(chunks), 2 * (os.cpu_count() or 1))
    if n > 1:
        with ThreadPoolExecutor(n) as pool:
            bad = [i for i in pool.map(lambda i: _check_chunk(path, i, chunk_bytes, chunks[i]), range(len(chunks)))
                   if i is not None]
    else:
        bad = [i for i in (_check_chunk(path, i, chunk_bytes, c) for i, c in enumerate(chunks)) if i is not None]
    if bad:
        lo = bad[0] * chunk_bytes
        raise _export_error(f"{path}: content differs from the manifest (sha256 mismatch in bytes {lo}-"
                            f"{min(lo + chunk_bytes, st.st_size)}; corrupted on disk or modified); write the "
                            "export again")
    _verified.add(key)


def verify_folder(folder: Path | str, prefix: str = "") -> int:
    """Verify every manifest file of `folder` under `prefix` (e.g. "llm/"); returns how many were checked."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        return 0
    names = [r for r in m["files"] if r.startswith(prefix)]
    if prefix and not names:
        raise _export_error(f"{folder / prefix}: missing from {folder / MANIFEST}; the export is incomplete")
    for rel in names:
        verify_file(folder, rel)
    return len(names)


def manifest_digest(folder: Path | str) -> Optional[str]:
    """sha256 of the folder's manifest.json (ties one output folder to another), or None without one."""
    path = Path(folder) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


__all__ = ["CHUNK", "MANIFEST", "StagedDir", "hash_file", "manifest_digest", "read_manifest", "recover",
           "staged_dir", "verify_file", "verify_folder", "write_manifest", "write_safetensors"]
