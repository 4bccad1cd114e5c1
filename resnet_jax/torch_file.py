"""Read and write PyTorch ``.pth`` files and ``.safetensors`` as ``{name: numpy array}``, without torch.

A ``.pth`` file is a zip holding a pickle (``data.pkl``) and one raw byte file per tensor storage. Unpickling
is code execution in disguise: any global the pickle names gets imported and called. So the unpickler here
admits only the handful of globals that rebuilding tensors needs and refuses every other one with
``UnsafeFileError`` *before* it is called: a hostile file is rejected, never run. Nor may a file change objects
it did not make: every object the pickle is handed is new for that load, and the opcodes that modify an object
(BUILD, SETITEM...) are allowed only on the containers a state_dict uses, so one file cannot alter what a later
load returns. A few bytes of file must not buy gigabytes of memory either: compressed zip entries (which
torch.save never writes) are refused, and tensors that expand a small storage come back as views.

Writing emits the same opcodes ``torch.save`` does, by hand, so ``torch.load(path, weights_only=True)`` accepts
the result and torch is not needed to produce it.

Reading a file that is not what its name says (truncated, damaged anywhere in the zip, the pickle or a
storage, or another format) raises ``WeightsFileError``: one sentence naming the file and what to do, never
the parser's own exception, whichever byte was damaged (tests/test_torch_file.py mutates files byte by byte).
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import json
import os
import pickle
import lzma
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from resnet_jax.atomic import replace_atomically

# torch's legacy storage classes, as pickled by torch.save, and the numpy dtype of each.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_DTYPE_STORAGES = {np.dtype(dtype): name for name, dtype in _STORAGE_DTYPES.items()}
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "model_state")


# What ``zipfile`` raises on a damaged archive, besides its own BadZipFile: a damaged header field reaches
# struct (a short record), the codecs (a file name that is not UTF-8: UnicodeDecodeError, a ValueError), zlib or
# lzma (a flipped compression method), EOFError/OSError (sizes or offsets past the end), NotImplementedError (an
# unknown compression method or zip version) and RuntimeError (a set "encrypted" flag).
_DAMAGED_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, struct.error, ValueError, zlib.error, lzma.LZMAError,
                EOFError, OSError, NotImplementedError, RuntimeError, KeyError, IndexError, OverflowError)


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state_dict: truncated, damaged, or in another format. The message
    names the file and says what to do; a ``ValueError``, so ``except ValueError`` keeps working."""


class UnsafeFileError(WeightsFileError):
    """A weights file asked to import something that is not needed to rebuild tensors (possibly malicious)."""


def _one_line(error: BaseException) -> str:
    """An underlying error as a short clause for our message: its type and its text on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


class UnsupportedDtypeError(WeightsFileError):
    """A weights file holding tensors of a dtype this reader does not read (uint16, float8, complex...): a plain
    torch file, not a hostile one, so the message says how to convert it rather than warning of malice."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside the pickle: the numpy dtype of the storages it names
    (``None`` for ``torch.UntypedStorage``, whose dtype comes with the tensor record). ``find_class`` makes a new one
    for every lookup, so nothing a pickle could do to it reaches another load."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]) if name in _STORAGE_DTYPES else None


def _rebuild_tensor(copy_budget: dict[int, int], storage: np.ndarray, offset: int, size, stride, *_ignored
                    ) -> np.ndarray:
    """Replacement for ``torch._utils._rebuild_tensor_v2`` (bound to its unpickler's ``copy_budget``): the strided
    view into the flat storage, copied (writeable, contiguous, owning its memory) while the copies taken from that
    storage add up to no more than the storage itself, else the read-only view.

    A few bytes of file must not buy gigabytes of memory: a one-element storage expanded (stride 0) to a
    25000x20000 tensor, or one storage named by thousands of tensor records, is returned as views that keep the
    storage alive (``.base``) and allocate nothing until a caller converts one, e.g. after checking its shape.
    """
    if id(storage) not in copy_budget:  # not a storage from persistent_load (as_strided below relies on that)
        raise WeightsFileError(f"corrupt tensor record: its storage is a {type(storage).__name__}")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise WeightsFileError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise WeightsFileError(f"corrupt tensor record: a {size} view at offset {offset} with stride {stride} reads "
                         f"past its storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:] if storage.size else storage, size,
                                           [s * itemsize for s in stride], writeable=False)
    if view.size > copy_budget[id(storage)]:
        return view
    copy_budget[id(storage)] -= view.size
    return np.array(view)


def _rebuild_tensor_v3(*args):
    """``torch._utils._rebuild_tensor_v3`` is what torch.save writes for the dtypes without a legacy storage class
    (uint16, float8...). Its dtype argument is a global that ``find_class`` refuses as unsupported before this can
    run, so reaching here means a record that torch never writes."""
    raise WeightsFileError(f"corrupt tensor record: a _rebuild_tensor_v3 record with dtype {str(args[6:7])[:100]}")


def _rebuild_parameter(data, *_ignored):
    """``nn.Parameter`` wraps a tensor: keep the tensor."""
    return data


class _OrderedDict(collections.OrderedDict):
    """The ``collections.OrderedDict`` of a pickle: the one kind of object whose state (torch's ``_metadata``
    attribute) the pickle may set with BUILD, so a type of our own that nothing else is."""


# The globals a state_dict pickle needs, as what they stand for here. find_class hands the pickle a new object for
# each lookup (a functools.partial of the callable, a _StorageType), never one of these module-level objects.
_CALLABLES = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_STORAGE_TYPES = {("torch", name) for name in _STORAGE_DTYPES} | {("torch", "UntypedStorage"),
                                                                  ("torch.storage", "UntypedStorage")}

# Globals that torch.save writes for tensors of dtypes this reader does not read: the dtype of a
# _rebuild_tensor_v3 record (torch.storage._new_dtypes()) and the legacy storages of complex tensors.
_UNSUPPORTED_DTYPES = {
    **{("torch", name): f"torch.{name}" for name in (
        "uint16", "uint32", "uint64", "complex32", "bcomplex32", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
        "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8",
        "bits16")},
    ("torch", "ComplexFloatStorage"): "torch.complex64",
    ("torch", "ComplexDoubleStorage"): "torch.complex128",
}
_SUPPORTED_DTYPES = ", ".join(np.dtype(dtype).name for dtype in _STORAGE_DTYPES.values())

_DICTS, _LISTS, _SETS = (dict, _OrderedDict), (list,), (set,)


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the globals a state_dict needs; tensor storages come from the zip via ``persistent_load``.

    Refusing globals is not enough: the opcodes that change an object already on the stack (BUILD, SETITEM(S),
    APPEND(S), ADDITEMS) would otherwise let a file rewrite what ``find_class`` handed it. With a class or function
    shared between loads, that poisons every later load in the process (a file that BUILDs slot state onto the
    OrderedDict class, replacing its ``items``, makes later honest files return the attacker's tensors). So:

    - ``find_class`` returns a new object for every lookup: nothing the pickle sees outlives its load;
    - each of those opcodes is narrowed to the objects a torch state_dict pickle applies it to, and refused with
      ``UnsafeFileError`` on anything else (BUILD: only the state_dict's OrderedDict, see ``load_build``).

    This is the pure-Python unpickler (``pickle._Unpickler``), not the C one, because only its ``dispatch`` table
    lets an opcode be replaced. A pickle holds only the metadata (ResNet-152's is 115 KB), so its speed is no
    concern: reading ResNet-152 takes as long as with the C unpickler, copying the storages dominates.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # a copy: pickle's own table stays untouched

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
        self.storages: dict[str, np.ndarray] = {}
        self.copy_budget: dict[int, int] = {}  # id(storage) -> how many more of its elements may be copied out
        self.globals: dict[int, tuple[Any, str]] = {}  # id -> (object, its global's name), for messages

    def _unsafe(self, what: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"refusing to load {self.path}: {what}. The file may be malicious, or holds objects other than tensors "
            "(optimizer state, custom classes). Nothing from it was run. If you trust it, re-save just the "
            "state_dict with torch.save(model.state_dict(), path).")

    def _described(self, obj: Any) -> str:
        if id(obj) in self.globals:
            return f"the global '{self.globals[id(obj)][1]}'"
        return f"a {type(obj).__name__}"

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 spells some names the Python 2 way (__builtin__.eval); judge and report them as Python 3's.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _UNSUPPORTED_DTYPES:
            raise UnsupportedDtypeError(
                f"cannot read {self.path}: it holds tensors of dtype {_UNSUPPORTED_DTYPES[module, name]}, which this "
                f"reader does not support (it reads {_SUPPORTED_DTYPES}). Cast those tensors to one of these, e.g. "
                "to float32 (t.float()) or bfloat16 (t.bfloat16()), and re-save the state_dict with torch.save.")
        if (module, name) in _STORAGE_TYPES:
            found = _StorageType(name)
        elif (module, name) in _CALLABLES:
            func = _CALLABLES[module, name]
            found = (functools.partial(func, self.copy_budget) if func is _rebuild_tensor
                     else functools.partial(func))
        else:
            raise self._unsafe(f"the file asks for the global '{module}.{name}', which rebuilding tensors never "
                               "needs")
        self.globals[id(found)] = (found, f"{module}.{name}")  # keeps it alive, so its id stays its own
        return found

    def persistent_load(self, pid: Any) -> np.ndarray | None:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise self._unsafe(f"unexpected persistent record {repr(pid)[:200]} (only tensor storages are allowed)")
        _, storage_type, key, _location, numel = pid
        if storage_type.dtype is None:  # untyped: a _rebuild_tensor_v3 record, refused at its dtype next
            return None
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise WeightsFileError(f"storage {str(key)[:100]!r} is missing from the archive") from None
            dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) % dtype.itemsize:
                raise WeightsFileError(f"storage {key!r} has {len(raw)} bytes, not a whole number of "
                                       f"{storage_type.name} elements")
            self.storages[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype, copy=False)
            self.copy_budget[id(self.storages[key])] = self.storages[key].size
        return self.storages[key]

    def load_build(self):
        """BUILD sets the state of the object under it. Python's own unpicklers call its ``__setstate__``, or
        update its ``__dict__`` and ``setattr`` "slot state" onto it: any object, a class or function included.
        torch.save emits BUILD for one thing, the ``_metadata`` attribute of a state_dict's OrderedDict; torch's
        weights-only unpickler allows it only on tensors and OrderedDicts, with a dict state. Allowed here: an
        OrderedDict this load made, a plain dict of string attribute names that shadow nothing of the class
        (``items``, ``get``...), put straight into its ``__dict__`` (never ``__setstate__``, never ``setattr``)."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not _OrderedDict:
            raise self._unsafe(f"its pickle sets the state of {self._described(inst)} (opcode BUILD), which a "
                               "state_dict never does (only its OrderedDict gets a _metadata attribute)")
        if type(state) is not dict:
            raise self._unsafe(f"its pickle sets the state of an OrderedDict from {self._described(state)} (opcode "
                               "BUILD), where a state_dict gives a dict of attributes")
        shadowing = [k for k in state if type(k) is not str or hasattr(_OrderedDict, k)]
        if shadowing:
            raise self._unsafe(f"its pickle sets the attributes {repr(shadowing)[:100]} of an OrderedDict (opcode "
                               "BUILD), which would replace what it has; a state_dict only adds new ones (_metadata)")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build

    def _only_into(self, target: Any, types: tuple[type, ...], opcode: str) -> None:
        """Refuses an opcode that adds items to ``target`` unless it is a container of ``types`` this load made."""
        if type(target) not in types:
            raise self._unsafe(f"its pickle adds items to {self._described(target)} (opcode {opcode}), which a "
                               "state_dict never does")

    # The target is under the value (SETITEM: and the key); for the MARK-delimited opcodes, on the stack that
    # MARK put aside (pop_mark restores it). An IndexError on a malformed pickle reads as corruption.
    def load_setitem(self):
        self._only_into(self.stack[-3], _DICTS, "SETITEM")
        super().load_setitem()

    def load_setitems(self):
        self._only_into(self.metastack[-1][-1], _DICTS, "SETITEMS")
        super().load_setitems()

    def load_append(self):
        self._only_into(self.stack[-2], _LISTS, "APPEND")
        super().load_append()

    def load_appends(self):
        self._only_into(self.metastack[-1][-1], _LISTS, "APPENDS")
        super().load_appends()

    def load_additems(self):
        self._only_into(self.metastack[-1][-1], _SETS, "ADDITEMS")
        super().load_additems()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    # The other opcodes that touch an existing object cannot reach one the load did not make: REDUCE, OBJ and INST
    # call it (only our new partials are callable), NEWOBJ(_EX) calls cls.__new__ (no class is ever handed out, so
    # it fails), and the memo belongs to this unpickler.


def _damaged(path, what: str) -> WeightsFileError:
    return WeightsFileError(f"{path} is corrupt or truncated ({what}); delete it and download or save it again.")


_COMPRESSION_NAMES = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def _refuse_compressed(archive: zipfile.ZipFile, path) -> None:
    """Refuses any entry that is not stored as is (before anything is read or inflated).

    torch.save never compresses an entry. A compressed one would be inflated whole into memory: a 522 KB file
    whose one storage deflates to 512 MiB took 1.6 GB to read, where a few bytes of file must not buy gigabytes.
    (The central directory's method is the one zipfile decompresses with, so checking it covers the entries.)
    """
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            method = _COMPRESSION_NAMES.get(info.compress_type, f"compression method {info.compress_type}")
            raise WeightsFileError(
                f"refusing to load {path}: its entry {info.filename[:100]!r} is compressed ({method}), which "
                "torch.save never writes (it stores every entry as is) and which could inflate to far more memory "
                "than the file's size. The file was made or changed by another tool, or is damaged: re-save it "
                "with torch.save (torch.save(torch.load(path, weights_only=True), path), if you trust it), or "
                "download it again.")


def _refuse_overlapping(archive: zipfile.ZipFile, path) -> None:
    """Refuses entries whose stored bytes overlap another entry's (each entry's header and data must end before
    the next entry starts, the last before the central directory). Nested entries, each one's data holding the
    next whole, pass every checksum and make a 2 MB file read as 300 storages of 2 MB (750 MB of memory);
    zipfile refuses them only from Python 3.11.8 / 3.12.2 on (CVE-2024-0450)."""
    entries = sorted(archive.infolist(), key=lambda info: info.header_offset)
    starts = [info.header_offset for info in entries[1:]] + [archive.start_dir]
    for info, next_start in zip(entries, starts):
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if info.header_offset + 30 + len(name) + info.compress_size > next_start:  # 30: the fixed local header
            raise WeightsFileError(
                f"refusing to load {path}: its entry {info.filename[:100]!r} overlaps the next entry of the archive, "
                "which torch.save never writes and which could make a small file read as many times its size; "
                "download or save it again (re-save it with torch.save, only if you trust it).")


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """The archive, after its header, the storing of every entry and every entry's checksum were checked."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80":  # a bare pickle: the legacy format, or a plain pickle of something
        raise WeightsFileError(f"{path} is in the legacy (pre-1.6) torch.save format, which cannot be read safely: "
                               "re-save it with a recent torch, torch.save(torch.load(path), path) (only if you "
                               "trust the file).")
    if not head.startswith(b"PK"):
        raise WeightsFileError(f"{path} is not a PyTorch .pth file (not a zip archive; it starts with "
                               f"{head[:8]!r}): it may be corrupt or truncated, or another format; download or "
                               "export it again.")
    archive = None
    try:
        archive = zipfile.ZipFile(path)
        _refuse_compressed(archive, path)
        _refuse_overlapping(archive, path)
        bad = archive.testzip()
    except WeightsFileError:  # a compressed entry (a ValueError, so before the clause below)
        archive.close()
        raise
    except _DAMAGED_ZIP as e:
        if archive is not None:
            archive.close()
        raise _damaged(path, _one_line(e)) from e
    if bad is not None:
        archive.close()
        raise WeightsFileError(f"{path} is corrupt: the entry {bad!r} fails its checksum; delete it and download "
                               "or save it again.")
    return archive


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict in a ``torch.save`` file, as ``{name: numpy array}``; torch is never imported.

    Accepts a plain state_dict or a checkpoint dict holding one under ``state_dict`` / ``model``. Raises
    ``UnsafeFileError`` for a pickle that names anything but tensor-rebuild globals or modifies objects it did not
    make, ``UnsupportedDtypeError`` for tensors of a dtype it does not read (uint16, float8...), and
    ``WeightsFileError`` (a ``ValueError``, the base of both) for a truncated, corrupt, compressed or legacy-format
    file, whatever part of it is damaged.
    """
    with _open_zip(path) as archive:
        try:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsFileError(f"{path} is a zip but not a torch.save archive (no unique <name>/data.pkl "
                                       f"among {names[:5]}...); it may be corrupt, or another format.")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in names:
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise _damaged(path, f"its byte order reads {byteorder[:20]!r}")
            data = archive.read(pickles[0])
        except WeightsFileError:
            raise
        except _DAMAGED_ZIP as e:
            raise _damaged(path, _one_line(e)) from e
        try:
            obj = _RestrictedUnpickler(data, archive, prefix, byteorder, path).load()
        except (UnsafeFileError, UnsupportedDtypeError, MemoryError):  # out of memory is no sign of damage
            raise
        except WeightsFileError as e:  # a storage or tensor record that does not fit: no path of its own
            raise _damaged(path, str(e)) from e
        except _DAMAGED_ZIP as e:  # reading a storage from the archive
            raise _damaged(path, _one_line(e)) from e
        except Exception as e:  # malformed opcodes, truncated pickle, a call with the wrong arguments...
            raise _damaged(path, f"the pickle inside is corrupt: {_one_line(e)}") from e
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if isinstance(obj, np.ndarray) or not isinstance(obj, Mapping) or not _is_state_dict(obj):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsFileError(f"{path} holds no state_dict (a mapping of names to tensors, alone or under one of "
                               f"{_CONTAINER_KEYS}); found {repr(keys)[:300]}")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


class _Opcodes:
    """Emits the protocol-2 pickle of a ``{name: tensor}`` OrderedDict exactly as torch.save lays it out."""

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(pickle.PROTO + b"\x02")

    def glob(self, module: str, name: str) -> None:
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def text(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out.write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def int(self, i: int) -> None:
        if -(2**31) <= i < 2**31:
            self.out.write(pickle.BININT + struct.pack("<i", i))
        else:
            data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(pickle.LONG1 + bytes([len(data)]) + data)

    def int_tuple(self, values) -> None:
        self.out.write(pickle.MARK)
        for v in values:
            self.int(int(v))
        self.out.write(pickle.TUPLE)

    def empty_ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)

    def tensor(self, key: str, array: np.ndarray) -> None:
        """``_rebuild_tensor_v2(storage, 0, shape, contiguous strides, False, OrderedDict())``."""
        strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out.write(pickle.MARK + pickle.MARK)
        self.text("storage")
        self.glob("torch", _DTYPE_STORAGES[array.dtype])
        self.text(key)
        self.text("cpu")
        self.int(array.size)
        self.out.write(pickle.TUPLE + pickle.BINPERSID)
        self.int(0)
        self.int_tuple(array.shape)
        self.int_tuple(strides)
        self.out.write(pickle.NEWFALSE)
        self.empty_ordered_dict()
        self.out.write(pickle.TUPLE + pickle.REDUCE)


def write_torch_file(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Save ``{name: array}`` as a ``.pth`` that ``torch.load(path, weights_only=True)`` reads as a state_dict.
    The file is replaced whole (``atomic``): a failed write keeps the one that was there."""
    arrays = {str(k): np.asarray(v, order="C") for k, v in tensors.items()}
    for name, a in arrays.items():
        if a.dtype not in _DTYPE_STORAGES:
            raise ValueError(f"cannot save {name!r}: dtype {a.dtype} has no torch equivalent; cast it first")
    ops = _Opcodes()
    ops.empty_ordered_dict()
    ops.out.write(pickle.MARK)
    for key, (name, a) in enumerate(arrays.items()):
        ops.text(name)
        ops.tensor(str(key), a)
    ops.out.write(pickle.SETITEMS + pickle.STOP)

    def write(partial: Path) -> None:
        prefix = "archive/"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as z:
            z.writestr(prefix + "data.pkl", ops.out.getvalue())
            z.writestr(prefix + "byteorder", "little")
            for key, a in enumerate(arrays.values()):
                z.writestr(prefix + f"data/{key}", a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
            z.writestr(prefix + "version", "3\n")

    replace_atomically(path, write)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as ``{name: numpy array}`` (the format holds no code, so no restrictions needed)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        unreadable = _safetensors_dtypes(path) - _SAFETENSORS_READ
        if unreadable:  # a sound file of a dtype numpy has no type for: "download it again" would not help
            raise UnsupportedDtypeError(
                f"cannot read {path}: it holds tensors of dtype {', '.join(sorted(unreadable))}, which this reader "
                f"does not support. Cast those tensors to float32 or bfloat16 and save the file again.") from e
        raise WeightsFileError(f"{path} is not a valid .safetensors file ({_one_line(e)}); it may be truncated: "
                               "save or download it again.") from e


# the safetensors dtypes its numpy reader turns into arrays (float8's have no numpy type)
_SAFETENSORS_READ = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64"}


def _safetensors_dtypes(path: str | os.PathLike) -> set[str]:
    """The dtypes a .safetensors header names (an 8-byte length, then JSON); empty where the header is unreadable."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 100_000_000)))
        return {str(entry.get("dtype")) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Save ``{name: array}`` as ``.safetensors`` (numpy arrays, jax arrays or anything ``np.asarray`` takes),
    replacing the file whole (``atomic``)."""
    from safetensors.numpy import save_file

    arrays = {str(k): np.asarray(v, order="C") for k, v in tensors.items()}
    replace_atomically(path, lambda partial: save_file(arrays, str(partial)))


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` or a torch ``.pth``/``.pt``/``.bin`` file, by what its first bytes are: a
    safetensors file under another name (a ``.bin`` saved by ``safetensors``) had been refused as "not a PyTorch
    .pth file", and a torch file named ``.safetensors`` as a truncated safetensors file. The extension decides
    only for a file that is neither (whose reader then says what is wrong with it)."""
    if _looks_like_safetensors(path):
        return read_safetensors(path)
    if _looks_like_torch_file(path) or not str(path).endswith(".safetensors"):
        return read_torch_file(path)
    return read_safetensors(path)


def _looks_like_torch_file(path: str | os.PathLike) -> bool:
    """``torch.save``'s zip archive (``PK\\x03\\x04``), or its legacy format (a pickle, protocol 2 or later)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _looks_like_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then that header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False  # the reader says what is wrong with the path
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Write ``.safetensors`` when the path says so, else a torch ``.pth``."""
    if str(path).endswith(".safetensors"):
        write_safetensors(path, tensors)
    else:
        write_torch_file(path, tensors)
