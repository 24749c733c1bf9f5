"""Every refusal of a state file, word for word: the message names the file and says what is
wrong with it (the other state-file tests check that each is refused and match a fragment);
and the files that must be accepted: npy version 2.0 members, version-1 files, a state with
nothing pending."""
import io
import json
import zipfile

import numpy as np
import pytest

from rmt_runtime import RMTRuntime, StateError

MEMBERS = ["has_logits", "header", "last_logits", "pending_lengths", "pending_tokens", "segments_done",
           "state.memory", "tokens_seen"]


@pytest.fixture(scope="module")
def saved(bundle_factory, tmp_path_factory):
    """A runtime and the arrays of one of its real state files (1 row: 2 segments run, 8 tokens pending)."""
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    state = rt.new_state()
    rt.feed(state, np.arange(40) % 97)
    path = tmp_path_factory.mktemp("state") / "s.npz"
    rt.save_state(state, path)
    with np.load(path) as archive:
        members = {name: archive[name] for name in archive.files}
    return rt, members


def header_of(members):
    return json.loads(bytes(members["header"]).decode())


def with_header(members, **fields):
    header = {**header_of(members), **fields}
    return {**members, "header": np.frombuffer(json.dumps(header).encode(), np.uint8)}


def npy(array, version=(1, 0), **header):
    buffer = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape,
              **header}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buffer, fields)
    else:
        np.lib.format.write_array_header_2_0(buffer, fields)
    buffer.write(array.tobytes())
    return buffer.getvalue()


def archive(path, members, raw=None, compressed=()):
    """A zip of ``members`` (name -> array, written as .npy) and ``raw`` (file name -> bytes)."""
    with zipfile.ZipFile(path, "w") as out:
        for name, value in members.items():
            kind = zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED
            out.writestr(zipfile.ZipInfo(f"{name}.npy"), npy(np.asarray(value)), compress_type=kind)
        for name, data in (raw or {}).items():
            out.writestr(zipfile.ZipInfo(name), data)
    return path


def refusal(rt, path):
    with pytest.raises(StateError) as info:
        rt.restore_state(path)
    return str(info.value)


# ---- the archive and its members ------------------------------------------------------------------
def test_files_that_are_not_state_archives(saved, tmp_path):
    rt, _ = saved
    missing = tmp_path / "none.npz"
    assert refusal(rt, missing) == f"{missing}: no such state file"
    assert refusal(rt, tmp_path) == (f"{tmp_path}: not a regular file; a state file is an .npz archive written "
                                     "by save_state")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    assert refusal(rt, text) == f"{text}: not a readable rmt-edge state file (File is not a zip file)"


def test_member_encodings_other_than_rmt_edges_are_refused(saved, tmp_path):
    rt, members = saved
    path = archive(tmp_path / "deflated.npz", members, compressed=("state.memory",))
    assert refusal(rt, path) == (f"{path}: member state.memory.npy is compressed; rmt-edge writes state files "
                                 "uncompressed (refusing to inflate it)")
    path = archive(tmp_path / "deflated-header.npz", members, compressed=("header",))
    assert refusal(rt, path) == (f"{path}: member header.npy is compressed; rmt-edge writes state files "
                                 "uncompressed (refusing to inflate it)")
    memory = members["state.memory"]
    fortran = {k: v for k, v in members.items() if k != "state.memory"}
    path = archive(tmp_path / "fortran.npz", fortran,
                   raw={"state.memory.npy": npy(memory, fortran_order=True)})
    assert refusal(rt, path) == (f"{path}: member state.memory.npy holds float32 Fortran-ordered data; state files "
                                 "hold plain C-ordered numbers")
    path = archive(tmp_path / "object.npz", {k: v for k, v in members.items() if k != "tokens_seen"},
                   raw={"tokens_seen.npy": npy(np.zeros(1, np.int64), descr="|O")})
    assert refusal(rt, path) == (f"{path}: member tokens_seen.npy holds object data; state files hold plain "
                                 "C-ordered numbers")
    path = archive(tmp_path / "short.npz", {k: v for k, v in members.items() if k != "state.memory"},
                   raw={"state.memory.npy": npy(np.zeros(8, np.float32), shape=memory.shape)})
    assert refusal(rt, path) == (f"{path}: member state.memory.npy declares shape [1, 4, 32] (512 bytes) but "
                                 "holds 32 bytes")
    path = archive(tmp_path / "garbage.npz", {k: v for k, v in members.items() if k != "tokens_seen"},
                   raw={"tokens_seen.npy": b"not an array at all"})
    message = refusal(rt, path)
    assert message.startswith(f"{path}: member tokens_seen.npy is not a readable .npy array (") and message.endswith(")")


def test_members_in_npy_version_2_are_read(saved, tmp_path):
    """numpy writes version 2.0 headers when 1.0's cannot hold them; they are as valid."""
    rt, members = saved
    path = tmp_path / "v2.npz"
    with zipfile.ZipFile(path, "w") as out:
        for name, value in members.items():
            out.writestr(zipfile.ZipInfo(f"{name}.npy"), npy(value, version=(2, 0)))
    state = rt.restore_state(path)
    np.testing.assert_array_equal(rt.memory(state), members["state.memory"])
    np.testing.assert_array_equal(state.pending[0], members["pending_tokens"])


def test_a_scalar_member_is_sized_by_its_itemsize(saved, tmp_path):
    """A 0-d member holds one item: its size is checked (and then its shape refused)."""
    rt, members = saved
    path = archive(tmp_path / "scalar.npz", {**members, "tokens_seen": np.array(40, np.int64)})
    assert refusal(rt, path) == f"{path}: tokens_seen is int64[], expected int64[1]"


# ---- the header ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header, reason", [
    (None, "(no readable header)"),
    (np.zeros(3, np.int64), "(no readable header)"),
    (np.zeros((2, 2), np.uint8), "(no readable header)"),
    (np.frombuffer(b"\xff\xfe", np.uint8), "(no readable header)"),
    (np.frombuffer(b"{not json", np.uint8), "(no readable header)"),
    (np.frombuffer(b"[1, 2]", np.uint8), "(format None)"),
    ("json-as-int8", "(no readable header)"),     # readable JSON, but not the uint8 bytes rmt-edge writes
    ("json-as-2d", "(no readable header)"),
    (np.frombuffer(b'{"format": "other"}', np.uint8), "(format 'other')"),
])
def test_a_file_without_an_rmt_edge_header_is_not_a_state_file(saved, tmp_path, header, reason):
    rt, members = saved
    files = {k: v for k, v in members.items() if k != "header"}
    if isinstance(header, str):
        text = members["header"]
        header = text.view(np.int8) if header == "json-as-int8" else text.reshape(1, -1)
    if header is not None:
        files["header"] = header
    path = archive(tmp_path / "h.npz", files)
    assert refusal(rt, path) == f"{path}: not an rmt-edge state file {reason}"


def test_a_header_member_up_to_64_kib_is_read(saved, tmp_path):
    """The header member may take 64 KiB (its .npy header included): it is read, and its unknown
    field named by the schema; one byte more is refused unread."""
    rt, members = saved
    overhead = len(npy(np.zeros(0, np.uint8)))  # an .npy header of a 1-D uint8 array (its size fits in 64 KiB)
    base = json.dumps({**header_of(members), "note": ""}).encode()
    for extra, accepted in ((0, True), (1, False)):
        padded = json.dumps({**header_of(members), "note": "x" * ((1 << 16) - overhead - len(base) + extra)}).encode()
        path = archive(tmp_path / f"pad{extra}.npz", {**members, "header": np.frombuffer(padded, np.uint8)})
        with zipfile.ZipFile(path) as zf:
            assert zf.getinfo("header.npy").file_size == (1 << 16) + extra
        if accepted:
            assert refusal(rt, path) == f"{path}: state header has unknown field(s) ['note']"
        else:
            assert refusal(rt, path) == f"{path}: not an rmt-edge state file (no readable header)"


def test_header_fields_are_refused_by_name(saved, tmp_path):
    rt, members = saved
    path = archive(tmp_path / "v.npz", with_header(members, version=3))
    assert refusal(rt, path) == f"{path}: state version 3 is not supported (this rmt-edge reads [1, 2])"
    path = archive(tmp_path / "id.npz", with_header(members, bundle_identity="abc", bundle_path="/elsewhere"))
    assert refusal(rt, path) == (f"{path}: saved from bundle '/elsewhere' (identity abc), not from bundle "
                                 f"{str(rt.bundle.path)!r} (identity {rt.identity}); a state only continues on its "
                                 "own bundle")
    for batch, why in ((0, ": Input should be greater than or equal to 1 (got 0)"),
                       (True, " has the wrong type (bool: True); Input should be a valid integer"),
                       (1.0, " has the wrong type (float: 1.0); Input should be a valid integer"),
                       ("1", " has the wrong type (str: '1'); Input should be a valid integer"),
                       (65537, ": Input should be less than or equal to 65536 (got 65537)")):
        path = archive(tmp_path / "b.npz", with_header(members, batch=batch))
        assert refusal(rt, path) == f"{path}: state header field 'batch'{why}"
    path = archive(tmp_path / "n.npz", with_header(members, note="x"))
    assert refusal(rt, path) == f"{path}: state header has unknown field(s) ['note']"
    path = archive(tmp_path / "big.npz", with_header(members, batch=65536))  # a batch size, not this file's
    assert refusal(rt, path) == f"{path}: state.memory is float32[1, 4, 32], expected float32[65536, 4, 32]"


# ---- the members a state file holds --------------------------------------------------------------
def test_members_other_than_a_state_files_are_refused(saved, tmp_path):
    rt, members = saved
    path = archive(tmp_path / "x.npz", {**members, "state.extra": members["state.memory"]})
    assert refusal(rt, path) == f"{path}: the file holds state ['extra', 'memory'], this bundle's state is ['memory']"
    path = archive(tmp_path / "u.npz", {**members, "extra": np.zeros(1)}, raw={"notes.txt": b"hi"})
    assert refusal(rt, path) == (f"{path}: unexpected members ['extra', 'notes.txt'] (an rmt-edge state file holds "
                                 f"only {MEMBERS})")
    six = {**members, **{f"extra{i}": np.zeros(1) for i in range(6)}}
    path = archive(tmp_path / "six.npz", six)
    assert refusal(rt, path) == (f"{path}: unexpected members ['extra0', 'extra1', 'extra2', 'extra3', 'extra4'] "
                                 f"(an rmt-edge state file holds only {MEMBERS})")
    for name in ("pending_tokens", "has_logits"):
        path = archive(tmp_path / "m.npz", {k: v for k, v in members.items() if k != name})
        assert refusal(rt, path) == f"{path}: state file is missing ['{name}']"
    path = archive(tmp_path / "s.npz", {**members, "pending_tokens": np.zeros((1, 8), np.int64)})
    assert refusal(rt, path) == f"{path}: pending_tokens is int64[1, 8], expected int64['N']"
    path = archive(tmp_path / "d.npz", {**members, "state.memory": members["state.memory"].astype(np.float64)})
    assert refusal(rt, path) == f"{path}: state.memory is float64[1, 4, 32], expected float32[1, 4, 32]"


@pytest.mark.parametrize("change, message", [
    (dict(pending_tokens=np.arange(3, dtype=np.int64), pending_lengths=np.array([2]), tokens_seen=np.array([34])),
     "pending tokens do not add up (3 tokens, lengths [2])"),
    (dict(pending_tokens=np.zeros(0, np.int64), pending_lengths=np.array([0]), tokens_seen=np.array([-1])),
     "tokens_seen [-1] out of range (0..9007199254740992)"),
    (dict(segments_done=np.array([-1])), "segments_done [-1] out of range (0..9007199254740992)"),
    (dict(tokens_seen=np.array([2**63 - 6])), "tokens_seen [9223372036854775802] out of range (0..9007199254740992)"),
    (dict(tokens_seen=np.array([7])), "counters do not add up (tokens_seen [7], segments_done [2], pending [8]): "
                                      "each segment run takes 1 to 16 of the tokens seen before the pending ones"),
    (dict(tokens_seen=np.array([60])), "counters do not add up (tokens_seen [60], segments_done [2], pending [8]): "
                                       "each segment run takes 1 to 16 of the tokens seen before the pending ones"),
    (dict(segments_done=np.array([33])), "counters do not add up (tokens_seen [40], segments_done [33], pending "
                                         "[8]): each segment run takes 1 to 16 of the tokens seen before the "
                                         "pending ones"),
    (dict(pending_tokens=np.array([1, 2, 3, 4, 5, 6, 7, 97])), "pending token id 97 is outside the vocabulary 0..96"),
    (dict(pending_tokens=np.array([1, 2, 3, -1, 5, 6, 7, 8])), "pending token id -1 is outside the vocabulary 0..96"),
    (dict(last_logits=np.full((1, 97), np.inf, np.float32)),
     "last_logits are missing or hold NaN or Inf for rows that have them"),
    (dict(last_logits=None), "last_logits are missing or hold NaN or Inf for rows that have them"),
    (dict(**{"state.memory": np.full((1, 4, 32), np.nan, np.float32)}), "state 'memory' holds NaN or Inf"),
])
def test_contents_that_do_not_add_up_are_refused(saved, tmp_path, change, message):
    rt, members = saved
    files = {k: v for k, v in {**members, **change}.items() if v is not None}
    files = {k: (v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in files.items()}
    path = archive(tmp_path / "c.npz", files)
    assert refusal(rt, path) == f"{path}: {message}"


def test_counters_that_add_up_are_accepted(saved, tmp_path):
    """The boundaries of the checks above: tokens_seen equal to pending, nothing pending, no logits."""
    rt, members = saved
    path = archive(tmp_path / "ok.npz", {**members, "tokens_seen": np.array([8], np.int64),
                                        "segments_done": np.array([0], np.int64)})
    state = rt.restore_state(path)
    assert state.tokens_seen.tolist() == [8] and state.segments_done.tolist() == [0]
    files = {k: v for k, v in members.items() if k != "last_logits"}
    path = archive(tmp_path / "empty.npz", {**files, "pending_tokens": np.zeros(0, np.int64),
                                           "pending_lengths": np.array([0], np.int64),
                                           "tokens_seen": np.array([32], np.int64),
                                           "has_logits": np.zeros(1, bool)})
    state = rt.restore_state(path)
    assert [p.tolist() for p in state.pending] == [[]] and state.last_logits is None


def test_a_version_1_file_holds_the_memory_under_its_own_name(saved, tmp_path):
    rt, members = saved
    old = {("memory" if k == "state.memory" else k): v for k, v in with_header(members, version=1).items()}
    state = rt.restore_state(archive(tmp_path / "v1.npz", old))
    np.testing.assert_array_equal(rt.memory(state), members["state.memory"])
    assert state.pending[0].tolist() == members["pending_tokens"].tolist()


# ---- what save_state writes -------------------------------------------------------------------------
def test_a_saved_file_holds_plain_arrays_of_the_documented_types(saved, tmp_path):
    rt, members = saved
    state = rt.new_state(batch=2)
    path = tmp_path / "fresh.npz"
    rt.save_state(state, path)  # nothing fed: no pending tokens, no logits
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(f"{m}.npy" for m in MEMBERS if m != "last_logits")
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    with np.load(path) as written:
        assert written["pending_tokens"].dtype == np.int64 and written["pending_tokens"].shape == (0,)
        assert written["pending_lengths"].dtype == np.int64 and written["pending_lengths"].tolist() == [0, 0]
        assert written["has_logits"].dtype == bool and written["tokens_seen"].dtype == np.int64
    header = header_of(dict(np.load(path)))
    assert header == {"format": "rmt-edge/state", "version": 2, "bundle_identity": rt.identity,
                      "bundle_path": str(rt.bundle.path), "batch": 2, "state": ["memory"]}
    assert members["last_logits"].dtype == np.float32 and members["last_logits"].shape == (1, 97)
