"""Reading and writing .pth without torch: exact tensors, torch accepts what we write, hostile files refused."""

import collections
import io
import pickle
import struct
import subprocess
import textwrap
import zipfile
import zlib

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import run_python
from resnet_jax import torch_file
from resnet_jax.torch_file import (UnsafeFileError, WeightsFileError, load_state_dict, read_safetensors,
                                   read_torch_file, save_state_dict, write_safetensors, write_torch_file)


def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "strided_view": torch.arange(10)[2:9:3],  # storage offset and stride
        "transposed": base.t(),  # non-contiguous: shares base's storage
        "shares_storage": base,
        "scalar": torch.tensor(7),
        "half": torch.randn(3, generator=g).half(),
        "bfloat16": torch.randn(3, generator=g).bfloat16(),
        "float64": torch.randn(2, 2, generator=g).double(),
        "int32": torch.tensor([1, -2], dtype=torch.int32),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(5, generator=g)),  # pickled via _rebuild_parameter
    }


def as_numpy(t):
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def assert_same(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        ref = as_numpy(t)
        got = np.asarray(ours[name]).astype(ref.dtype)
        assert got.shape == ref.shape and ours[name].dtype.itemsize == t.element_size(), name
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_reads_what_torch_saves(tmp_path):
    torch.save(tensors(), tmp_path / "t.pth")
    assert_same(read_torch_file(tmp_path / "t.pth"), tensors())


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_reads_state_dict_nested_in_checkpoint(tmp_path, key):
    state = torch.nn.Conv2d(3, 4, 3).state_dict()
    torch.save({key: state, "epoch": 3, "best_acc": 0.5}, tmp_path / "ckpt.pt")
    assert_same(read_torch_file(tmp_path / "ckpt.pt"), state)


def test_written_file_loads_in_torch_weights_only(tmp_path):
    arrays = {k: as_numpy(v) for k, v in tensors().items() if k != "bfloat16"}
    write_torch_file(tmp_path / "ours.pth", arrays)
    loaded = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert list(loaded) == list(arrays)
    for name, a in arrays.items():
        assert loaded[name].shape == a.shape and loaded[name].is_contiguous(), name
        np.testing.assert_array_equal(loaded[name].numpy(), a, err_msg=name)
    assert loaded["scalar"].dtype == torch.int64 and loaded["scalar"].shape == ()
    assert_same(read_torch_file(tmp_path / "ours.pth"), loaded)  # and back through our own reader


def test_written_bfloat16_loads_in_torch(tmp_path):
    t = torch.randn(4).bfloat16()
    write_torch_file(tmp_path / "bf.pth", read_torch_file_of({"x": t}, tmp_path))
    assert torch.equal(torch.load(tmp_path / "bf.pth", weights_only=True)["x"], t)


def read_torch_file_of(state, tmp_path):
    torch.save(state, tmp_path / "src.pth")
    return read_torch_file(tmp_path / "src.pth")


def test_safetensors_both_ways(tmp_path):
    state = {k: v.detach().contiguous() for k, v in tensors().items() if k != "shares_storage"}
    safetensors.torch.save_file(state, tmp_path / "theirs.safetensors")
    assert_same(load_state_dict(tmp_path / "theirs.safetensors"), state)
    arrays = {k: as_numpy(v) for k, v in state.items() if k != "bfloat16"}
    save_state_dict(tmp_path / "ours.safetensors", arrays)
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert_same(read_safetensors(tmp_path / "ours.safetensors"), theirs)
    assert_same(arrays, theirs)


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="complex64 has no torch equivalent"):
        write_torch_file(tmp_path / "c.pth", {"z": np.zeros(2, np.complex64)})


# --- hostile files ---------------------------------------------------------------------------------------------

class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does on unpickling."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    import builtins
    import os

    write = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(builtins.exec, write),
        "builtins.eval": Payload(builtins.eval, write),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "subprocess.check_output": Payload(subprocess.check_output, ["touch", str(marker)]),
    }


def hostile_pth(path, payload, protocol):
    """A torch-like zip whose data.pkl runs ``payload`` when unpickled, hidden among ordinary entries."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"fc.bias": payload}, protocol=protocol))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.call",
                                  "subprocess.check_output"])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, kind, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    hostile_pth(path, payloads(marker)[kind], protocol)
    with pytest.raises(UnsafeFileError) as info:
        read_torch_file(path)
    assert isinstance(info.value, ValueError)
    func = payloads(marker)[kind].func
    assert f"{func.__module__}.{func.__qualname__}" in str(info.value)  # names the global (posix.system for os)
    assert "Nothing from it was run" in str(info.value)
    assert not marker.exists()
    # The payload is real: an ordinary unpickler does run it.
    run_python(f"import pickle, zipfile; pickle.loads(zipfile.ZipFile({str(path)!r}).read('archive/data.pkl'))",
               timeout=60, check=False)
    assert marker.exists()


def test_hostile_storage_type_is_refused(tmp_path):
    """A global smuggled into the storage record (where torch puts FloatStorage) is refused too."""
    import os

    marker = tmp_path / "marker"
    pid = ("storage", Payload(os.system, f"touch {marker}"), "0", "cpu", 1)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return pid if obj == "TENSOR" else None

    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        Pickler(buf, protocol=2).dump({"w": "TENSOR"})
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", b"\0\0\0\0")
    with pytest.raises(UnsafeFileError, match="system"):
        read_torch_file(tmp_path / "evil.pth")
    assert not marker.exists()


# A pickle is assembled opcode by opcode below, for files that no pickler writes but an attacker can.
def op_text(s: str) -> bytes:
    data = s.encode()
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


# A float32 tensor of 4 elements from storage "0": what torch.save writes for one tensor.
OP_TENSOR = (op_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pickle.MARK + op_text("storage")
             + op_global("torch", "FloatStorage") + op_text("0") + op_text("cpu") + pickle.BININT1 + b"\x04"
             + pickle.TUPLE + pickle.BINPERSID + pickle.BININT1 + b"\x00" + pickle.BININT1 + b"\x04" + pickle.TUPLE1
             + pickle.BININT1 + b"\x01" + pickle.TUPLE1 + pickle.NEWFALSE + pickle.EMPTY_TUPLE + pickle.TUPLE
             + pickle.REDUCE)

# Pickle fragments that modify an object the file did not make, each leaving the stack as it found it.
TAMPERING = {
    # The reviewer's repro: partial.__setstate__ turns the _rebuild_tensor_v2 partial into one returning the
    # attacker's items, then BUILD's slot state setattr()s it as the OrderedDict class's `items`: every later
    # load of an honest file returned {"fc.bias": [666, 666, 666, 666]}.
    "items of the OrderedDict class, via a partial's __setstate__": (
        op_global("torch._utils", "_rebuild_tensor_v2") + pickle.BINPUT + b"\x00"
        + pickle.EMPTY_LIST + pickle.MARK + pickle.MARK + op_text("fc.bias") + OP_TENSOR + pickle.TUPLE
        + pickle.APPENDS + pickle.BINPUT + b"\x01" + pickle.POP
        + pickle.BINGET + b"\x00" + pickle.MARK + op_global("torch._utils", "_rebuild_parameter")
        + pickle.MARK + pickle.BINGET + b"\x01" + pickle.TUPLE + pickle.EMPTY_DICT + pickle.NONE + pickle.TUPLE
        + pickle.BUILD + pickle.POP
        + op_global("collections", "OrderedDict") + pickle.MARK + pickle.NONE + pickle.EMPTY_DICT
        + op_text("items") + pickle.BINGET + b"\x00" + pickle.SETITEM + pickle.TUPLE + pickle.BUILD + pickle.POP),
    "slot state on the OrderedDict class": (
        op_global("collections", "OrderedDict") + pickle.NONE + pickle.EMPTY_DICT + op_text("items")
        + op_global("torch._utils", "_rebuild_parameter") + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD
        + pickle.POP),
    "dict state on a storage type": (
        op_global("torch", "FloatStorage") + pickle.EMPTY_DICT + op_text("dtype") + pickle.NONE + pickle.SETITEM
        + pickle.BUILD + pickle.POP),
    "dict state shadowing an OrderedDict's items": (
        op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.EMPTY_DICT
        + op_text("items") + op_global("torch._utils", "_rebuild_parameter") + pickle.SETITEM + pickle.BUILD
        + pickle.POP),
    "SETITEMS into a storage type": (
        op_global("torch", "FloatStorage") + pickle.MARK + op_text("dtype") + pickle.NONE + pickle.SETITEMS
        + pickle.POP),
    "APPEND onto a rebuild function": (
        op_global("torch._utils", "_rebuild_parameter") + pickle.NONE + pickle.APPEND + pickle.POP),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_file_that_modifies_objects_it_did_not_make_is_refused(tmp_path, tampering):
    """BUILD, SETITEM(S), APPEND(S) on an object a state_dict pickle never applies them to are refused as unsafe,
    and an honest file read after the hostile one in the same process still gives its own tensors (the reader
    once handed every load the same OrderedDict class and storage types, which a file could rewrite for the
    next loads)."""
    pickled = pickle.PROTO + b"\x02" + TAMPERING[tampering] + pickle.EMPTY_DICT + op_text("x") + OP_TENSOR
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        for name, content in [("data.pkl", pickled + pickle.SETITEM + pickle.STOP), ("byteorder", "little"),
                              ("data/0", np.full(4, 666, np.float32).tobytes()), ("version", "3\n")]:
            z.writestr(f"archive/{name}", content)
    honest = torch.nn.Linear(4, 2).state_dict()
    torch.save(honest, tmp_path / "honest.pth")

    with pytest.raises(UnsafeFileError, match=r"refusing to load .*evil\.pth: its pickle .*\(opcode [A-Z]+\)") as e:
        read_torch_file(tmp_path / "evil.pth")
    assert "Nothing from it was run" in str(e.value) and "torch.save(model.state_dict(), path)" in str(e.value)
    assert_same(read_torch_file(tmp_path / "honest.pth"), honest)


def test_real_state_dict_with_metadata_reads_identically(tmp_path):
    """torch.save's only BUILD, the `_metadata` attribute of a module's state_dict, is still allowed."""
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    assert "layer1.0" in torch.load(tmp_path / "r18.pth", weights_only=True)._metadata  # the file has it
    ours = read_torch_file(tmp_path / "r18.pth")
    assert list(ours) == list(state)
    assert_same(ours, state)


@pytest.mark.parametrize("entry, method, name", [("data/0", zipfile.ZIP_DEFLATED, "deflate"),
                                                 ("data.pkl", zipfile.ZIP_LZMA, "lzma")])
def test_compressed_entry_is_refused(tmp_path, entry, method, name):
    """torch.save stores every entry as is; a compressed one (a 522 KB file inflating to 512 MiB took 1.6 GB to
    read) is refused before anything is inflated."""
    write_torch_file(tmp_path / "ok.pth", {"w": np.zeros(1000, np.float32)})
    with zipfile.ZipFile(tmp_path / "ok.pth") as src, zipfile.ZipFile(tmp_path / "packed.pth", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info),
                         method if info.filename == f"archive/{entry}" else zipfile.ZIP_STORED)
    with pytest.raises(WeightsFileError, match=rf"refusing to load .*packed\.pth: its entry 'archive/{entry}' is "
                                               rf"compressed \({name}\), which torch\.save never writes.*re-save it "
                                               r"with torch\.save") as info:
        read_torch_file(tmp_path / "packed.pth")
    assert "\n" not in str(info.value)


def stored_zip(entries, nested_from: int) -> bytes:
    """A stored (uncompressed) zip of ``entries`` [(name, bytes)], written by hand: from index ``nested_from`` on,
    each entry's data is the rest of the chain (the next entry's header and data, and so on), a "quoted overlap"
    that every checksum accepts."""
    def header(name, data, central_offset=None):
        crc, n = zlib.crc32(data), name.encode()
        if central_offset is None:
            return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(n), 0) + n
        return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(n),
                           0, 0, 0, 0, 0, central_offset) + n
    body, central, datas = b"", b"", {}
    for name, data in entries[:nested_from]:
        central += header(name, data, len(body))
        body += header(name, data) + data
    chain = b""
    for name, data in reversed(entries[nested_from:]):
        datas[name] = chain or data  # the innermost entry keeps its own bytes
        chain = header(name, datas[name]) + datas[name]
    offset = len(body)
    for name, _ in entries[nested_from:]:
        central += header(name, datas[name], offset)
        offset += len(header(name, datas[name]))
    body += chain
    return body + central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central),
                                        len(body), 0)


def test_overlapping_entries_are_refused_before_anything_is_read(tmp_path):
    """Storages whose zip entries nest pass every checksum, and each was read whole: 40 storages in a 100 KB file
    read as 4 MB (300 in a 2 MB file took 750 MB). Python 3.11.8 and 3.12.2 refuse them; older ones did not."""
    count, size = 40, 100_000
    torch.save({f"t{k}": torch.zeros(size, dtype=torch.uint8) for k in range(count)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as plain:
        storages = sorted((n for n in plain.namelist() if "/data/" in n), key=lambda n: int(n.rsplit("/", 1)[1]))
        others = [(n, plain.read(n)) for n in plain.namelist() if n not in storages]
        entries = others + [(n, b"\0" * size) for n in storages]
    (tmp_path / "nested.pth").write_bytes(stored_zip(entries, len(others)))
    assert (tmp_path / "nested.pth").stat().st_size < 2 * size
    with zipfile.ZipFile(tmp_path / "nested.pth") as nested:  # a valid archive to zipfile, every checksum right
        assert nested.testzip() is None and sum(i.file_size for i in nested.infolist()) > count * size
    with pytest.raises(WeightsFileError, match=r"refusing to load .*nested\.pth: its entry '.*/data/0' overlaps "
                                               r"the next entry"):
        read_torch_file(tmp_path / "nested.pth")
    (tmp_path / "flat.pth").write_bytes(stored_zip(entries, len(entries)))  # the same, written one after another
    assert sorted(read_torch_file(tmp_path / "flat.pth")) == sorted(f"t{k}" for k in range(count))


@pytest.mark.parametrize("dtype", ["uint16", "float8_e4m3fn", "complex64"])
def test_unsupported_dtype_says_to_cast_not_that_the_file_is_unsafe(tmp_path, dtype):
    """uint16 and float8 (torch._utils._rebuild_tensor_v3) and complex tensors are plain torch.save output: the
    message names the dtype and the ones to cast to; re-saving as is would not help, and the file is no threat."""
    torch.save({"w": torch.zeros(2, dtype=getattr(torch, dtype))}, tmp_path / "t.pth")
    with pytest.raises(torch_file.UnsupportedDtypeError,
                       match=rf"t\.pth: it holds tensors of dtype torch\.{dtype}, which this reader does not support "
                             r"\(it reads float64, float32, .*bfloat16.*\)\. Cast those tensors .* re-save") as info:
        read_torch_file(tmp_path / "t.pth")
    assert not isinstance(info.value, UnsafeFileError) and "malicious" not in str(info.value)
    assert isinstance(info.value, WeightsFileError)


def test_unknown_tensor_kind_is_still_refused_as_unsafe(tmp_path):
    torch.save({"w": torch.zeros(2, 2).to_sparse()}, tmp_path / "sparse.pth")
    with pytest.raises(UnsafeFileError, match=r"torch\._utils\._rebuild_sparse_tensor.*Nothing from it was run"):
        read_torch_file(tmp_path / "sparse.pth")


# --- damaged and foreign files ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.save(torch.nn.Conv2d(3, 16, 3).state_dict(), tmp_path / "good.pth")
    return (tmp_path / "good.pth").read_bytes()


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_file_is_a_clear_error(tmp_path, saved, keep):
    path = tmp_path / "cut.pth"
    path.write_bytes(saved[: int(len(saved) * keep)])
    with pytest.raises(ValueError, match="corrupt or truncated.*download or save it again"):
        read_torch_file(path)


def test_flipped_bytes_are_a_clear_error(tmp_path, saved):
    data = bytearray(saved)
    offset = zipfile.ZipFile(tmp_path / "good.pth").getinfo("good/data/0").header_offset
    name_len, extra_len = (int.from_bytes(data[offset + i: offset + i + 2], "little") for i in (26, 28))
    start = offset + 30 + name_len + extra_len
    data[start: start + 8] = bytes(255 - b for b in data[start: start + 8])  # inside the weight tensor
    (tmp_path / "bad.pth").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.*fails its checksum"):  # the zip's CRC catches it
        read_torch_file(tmp_path / "bad.pth")


@pytest.mark.parametrize("content", [b"", b"<html>404 Not Found</html>", b"\x00" * 64])
def test_non_zip_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(ValueError, match="not a PyTorch .pth file.*corrupt or truncated"):
        read_torch_file(tmp_path / "x.pth")


def test_legacy_format_says_to_resave(tmp_path):
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy.*re-save it with a recent torch"):
        read_torch_file(tmp_path / "old.pth")


def test_file_without_tensors_is_a_clear_error(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="holds no state_dict.*'epoch'"):
        read_torch_file(tmp_path / "meta.pth")


def test_bad_safetensors_is_a_clear_error(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(100, np.float32)})
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="not a valid .safetensors file.*truncated"):
        read_safetensors(tmp_path / "a.safetensors")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_safetensors_file_of_a_dtype_without_numpy_type_says_to_cast_not_to_download_again(tmp_path, dtype):
    """A sound float8 file was called "not a valid .safetensors file ... truncated: download it again"."""
    safetensors.torch.save_file({"w": torch.zeros(4, dtype=dtype), "b": torch.zeros(2)}, tmp_path / "f8.safetensors")
    with pytest.raises(torch_file.UnsupportedDtypeError, match=r"dtype F8_E.M.*Cast those tensors to float32") as err:
        read_safetensors(tmp_path / "f8.safetensors")
    assert "truncated" not in str(err.value)


def test_pickled_module_is_refused_with_a_hint(tmp_path):
    """A whole pickled nn.Module (torch.save(model)) needs its class imported: refused, with the way out."""
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "module.pth")
    with pytest.raises(UnsafeFileError, match=r"torch\.nn\.modules\.container\.Sequential.*torch\.save\(model\."
                                              r"state_dict\(\), path\)"):
        read_torch_file(tmp_path / "module.pth")


def test_storage_shorter_than_its_tensor_is_a_clear_error(tmp_path):
    write_torch_file(tmp_path / "ok.pth", {"w": np.ones((4, 4), np.float32)})
    with zipfile.ZipFile(tmp_path / "ok.pth") as src, zipfile.ZipFile(tmp_path / "short.pth", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name)[:8] if name.endswith("data/0") else src.read(name))
    with pytest.raises(ValueError, match="reads past its storage of 2 elements"):
        read_torch_file(tmp_path / "short.pth")


def test_views_larger_than_their_storage_are_read_as_views(tmp_path):
    """Expanded (stride 0) tensors, and one storage named by many tensors, come back equal to torch's but as
    read-only views: the arrays own no more memory than the file's storages hold (a copy each would not)."""
    base = torch.arange(24.0).view(4, 6)
    state = {
        "expanded": torch.tensor([1.5, -2.0, 3.0]).expand(5, 3),
        "expanded_offset": torch.arange(10)[2:5][:, None].expand(3, 4),  # storage offset, strides (1, 0)
        "expanded_middle": base.t()[1:, None, ::2].expand(5, 8, 2),
        **{f"alias{i}": base.view(4, 6) for i in range(50)},  # one storage, fifty tensor records
        "transposed": base.t(), "sliced": base[1:3, 2:],
    }
    torch.save(state, tmp_path / "views.pth")
    ours = read_torch_file(tmp_path / "views.pth")
    assert_same(ours, torch.load(tmp_path / "views.pth", weights_only=True))
    for name in ["expanded", "expanded_offset", "expanded_middle", "alias49"]:
        assert not ours[name].flags.owndata and not ours[name].flags.writeable, name
    owned = sum(a.nbytes for a in ours.values() if a.flags.owndata)
    assert owned <= 3 * 4 + 10 * 8 + 24 * 4  # the three storages
    np.asarray(ours["alias0"])[0, 0] = 7  # a copy, while the budget of its storage lasts: writeable and its own
    assert ours["alias49"][0, 0] == 0


# A 1.5 KB file holding a 2 GB (25000 x 20000 float32) tensor: one element, expanded with stride 0.
BOMB_SHAPE = (25000, 20000)


def peak_rss_growth_kb(snippet: str, *args) -> tuple[int, str]:
    """Run ``snippet`` (which defines ``result``) in a fresh process; the growth of its peak RSS in KiB across
    the snippet, and ``repr(result)``."""
    proc = run_python("\n".join([
        "import resource, sys, resnet_jax",
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
        "before = peak()",
        textwrap.dedent(snippet),
        "print(peak() - before)",
        "print(repr(result))"]), args=args)
    growth, result = proc.stdout.strip().splitlines()[-2:]
    return int(growth), result


def test_expanded_tensor_reads_without_allocating_it(tmp_path):
    torch.save({"big": torch.tensor([2.5]).expand(*BOMB_SHAPE)}, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 4096
    growth, result = peak_rss_growth_kb("""
        a = resnet_jax.read_torch_file(sys.argv[1])["big"]
        result = (a.shape, a.strides, str(a.dtype), a.flags.writeable, float(a[0, 0]), float(a[-1, -1]))
        """, tmp_path / "bomb.pth")
    assert result == repr((BOMB_SHAPE, (0, 0), "float32", False, 2.5, 2.5))
    assert growth < 200_000, f"reading a 1.5 KB file grew the peak RSS by {growth} KiB"


def test_misshaped_expanded_head_is_refused_without_allocating_it(tmp_path):
    """The converter compares shapes before it converts, so a mis-shaped view is never materialised."""
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet18().state_dict()
    state["fc.weight"] = torch.zeros(1).expand(*BOMB_SHAPE)
    torch.save(state, tmp_path / "r18.pth")
    growth, result = peak_rss_growth_kb("""
        try:
            resnet_jax.load_torchvision("resnet18", sys.argv[1])
            result = "loaded"
        except ValueError as e:
            result = str(e)
        """, tmp_path / "r18.pth")
    assert "1 mis-shaped:\\n    fc.weight: file has (25000, 20000), model needs (1000, 512)" in result, result
    assert growth < 500_000, f"refusing the file grew the peak RSS by {growth} KiB"


def test_tensor_rebuilt_over_another_tensor_is_refused(tmp_path):
    """A tensor record's storage must be a storage from the archive: a view (expanded, stride 0) passed as the
    storage of another record would make as_strided read past the view's 4-byte buffer."""
    class Storage:
        pass

    class Rebuild:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 1) if isinstance(obj, Storage) else None

    expanded = Rebuild(Storage(), 0, (1000,), (0,), False, collections.OrderedDict())
    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"w": Rebuild(expanded, 0, (1000,), (1,), False, collections.OrderedDict())})
    with zipfile.ZipFile(tmp_path / "nested.pth", "w") as z:
        for name, content in [("data.pkl", data.getvalue()), ("byteorder", "little"),
                              ("data/0", np.ones(1, np.float32).tobytes())]:
            z.writestr(f"archive/{name}", content)
    with pytest.raises(WeightsFileError, match=r"nested\.pth is corrupt.*its storage is a ndarray"):
        read_torch_file(tmp_path / "nested.pth")


def test_out_of_memory_is_not_reported_as_a_corrupt_file(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pth")

    def out_of_memory(*_args):
        raise MemoryError("Unable to allocate 2.00 GiB")

    monkeypatch.setattr(torch_file._RestrictedUnpickler, "persistent_load", out_of_memory)
    with pytest.raises(MemoryError, match="Unable to allocate"):
        read_torch_file(tmp_path / "ok.pth")


@pytest.mark.parametrize("where", ["local header", "central directory"])
def test_damaged_file_name_in_the_zip_is_a_clear_error(tmp_path, saved, where):
    """torch's zip marks its file names UTF-8; one byte of a name made invalid UTF-8 makes zipfile raise a bare
    UnicodeDecodeError (from testzip for the local header, from ZipFile for the central directory), which must
    come out as the same one-sentence error as any other damage."""
    data = bytearray(saved)
    name = b"good/data/0"
    at = data.find(name) if where == "local header" else data.rfind(name)
    assert data.find(name) != data.rfind(name)  # the name is in both places
    data[at + len(b"good/data/")] = 0xFF  # never valid in UTF-8
    path = tmp_path / "bad.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(UnicodeDecodeError):  # what zipfile itself does with this file
        zipfile.ZipFile(path).testzip()
    with pytest.raises(WeightsFileError, match=r"bad\.pth is corrupt or truncated \(UnicodeDecodeError: .*\); "
                                               r"delete it and download or save it again\.$") as info:
        read_torch_file(path)
    assert "\n" not in str(info.value)


def single_byte_damages(data: bytes, count: int, seed: int):
    """``count`` copies of ``data``, each with the byte at another (seeded) position replaced by another value."""
    rng = np.random.default_rng(seed)
    for at in sorted(rng.choice(len(data), min(count, len(data)), replace=False)):
        damaged = bytearray(data)
        damaged[at] ^= int(rng.integers(1, 256))
        yield int(at), bytes(damaged)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_single_byte_damage_loads_or_gives_one_sentence(tmp_path, suffix):
    """A small torch.save / safetensors file damaged at 300 seeded positions, one at a time (zip header fields,
    file names, checksums, the pickle, storage bytes; the safetensors header): each copy either loads or raises
    WeightsFileError, in one line that names the file; never another exception (a bare UnicodeDecodeError or
    struct.error from a parser) and never a hang."""
    state = torch.nn.Conv2d(3, 4, 3).state_dict()
    good = tmp_path / f"good{suffix}"
    torch.save(state, good) if suffix == ".pth" else safetensors.torch.save_file(state, good)
    path, loaded, refused = tmp_path / f"damaged{suffix}", 0, 0
    for at, damaged in single_byte_damages(good.read_bytes(), 300, seed=0):
        path.write_bytes(damaged)
        try:
            load_state_dict(path)
            loaded += 1
        except WeightsFileError as e:
            assert str(path) in str(e) and "\n" not in str(e), (at, str(e))
            refused += 1
        except Exception as e:  # noqa: BLE001 - what is under test is that no other exception escapes
            pytest.fail(f"byte {at} damaged: {type(e).__name__}: {e}")
    assert refused > 0 and loaded + refused == 300


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_failed_save_keeps_the_file_it_would_replace(tmp_path, suffix):
    """Used to be: a .pth written in place, so a save that failed mid-write (a full disk) left a truncated file
    where the previous export was. A child process whose file-size limit lets the first, small export through
    and stops the second, larger one mid-write (EFBIG, a real failed write): the first stays, whole, and no
    partial copy is left beside it."""
    path = tmp_path / f"model{suffix}"
    proc = run_python(f"""
        import resource, signal
        import numpy as np
        from resnet_jax.torch_file import load_state_dict, save_state_dict

        save_state_dict({str(path)!r}, {{"w": np.ones((64, 64), np.float32)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            save_state_dict({str(path)!r}, {{"w": np.zeros((512, 512), np.float32)}})  # 1 MB
        except Exception as err:
            print("failed:", type(err).__name__)
    """)
    assert "failed:" in proc.stdout, proc.stdout + proc.stderr
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.ones((64, 64), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_file_under_another_formats_name_is_read_by_its_first_bytes(tmp_path):
    """A ``.bin`` written by safetensors (as some hub repositories name them) was refused as "not a PyTorch
    .pth file", and a torch file named ``.safetensors`` as a truncated safetensors file ("download it again");
    each now reads as what it is, and a damaged ``.safetensors`` is still a safetensors error."""
    state = {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    safetensors.torch.save_file(state, tmp_path / "model.bin")
    torch.save(state, tmp_path / "torch.bin")
    torch.save(state, tmp_path / "torch.safetensors")
    torch.save(state, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    for name in ("model.bin", "torch.bin", "torch.safetensors"):
        np.testing.assert_array_equal(load_state_dict(tmp_path / name)["fc.weight"], state["fc.weight"].numpy())
    with pytest.raises(WeightsFileError, match="legacy"):
        load_state_dict(tmp_path / "legacy.safetensors")  # torch's reader says what it is
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.bin").read_bytes()[:40])
    with pytest.raises(WeightsFileError, match="not a valid .safetensors file"):
        load_state_dict(tmp_path / "cut.safetensors")
