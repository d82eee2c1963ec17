"""Hostile input and failure (issue 13): each case through real files and the reference libraries.

- safetensors data that is not covered contiguously (bytes inserted, a gap between tensors, trailing bytes)
  is refused, as the ``safetensors`` library refuses it, instead of loading shifted tensors;
- upstream tensorizer files with an empty index or unknown feature-flag bits are refused, as ``tensorizer``
  refuses them;
- with ``HF_TENSORIZER_KEY`` set, a file whose encryption was stripped is refused, not loaded as ciphertext;
- a key-derivation cost above ``MAX_OPSLIMIT``/``MAX_MEMLIMIT`` in a file header fails fast, before Argon2 runs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from helpers import SHA_OFFSET, assert_same, patch_preamble, preamble_field, with_index

from hf_tensorizer import TensorDeserializer, TensorSerializer, read_index
from hf_tensorizer.constants import KEY_ENV
from hf_tensorizer.crypto import EncryptionKey, Passphrase
from hf_tensorizer.crypto.keys import MAX_MEMLIMIT, MAX_OPSLIMIT
from hf_tensorizer.engine.reencrypt import convert
from hf_tensorizer.errors import DecryptionError, FormatError, MissingKeyError, UnsupportedVersionError, UsageError

st_torch = pytest.importorskip("safetensors.torch")
tensorizer = pytest.importorskip("tensorizer")
pytest.importorskip("nacl")
from tensorizer.serialization import EncryptionParams  # noqa: E402

SD = {"a": torch.arange(6, dtype=torch.float32), "b": torch.arange(4, dtype=torch.int16), "c": torch.ones(3)}


# ---- safetensors coverage --------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _shifted(header: dict, by: int) -> dict:
    return {k: v if k == "__metadata__" else {**v, "data_offsets": [o + by for o in v["data_offsets"]]}
            for k, v in header.items()}  # fmt: skip


def _safetensors_variants(good: bytes) -> dict[str, bytes]:
    header, body = _split(good)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first_end = header[order[0]]["data_offsets"][1]
    gap = json.loads(json.dumps(header))
    for k in order[1:]:  # 4 bytes between the first tensor and the rest, offsets moved past them
        gap[k]["data_offsets"] = [o + 4 for o in gap[k]["data_offsets"]]
    return {
        "inserted bytes": _join(header, body[:first_end] + b"\xff" * 4 + body[first_end:]),
        "gap between tensors": _join(gap, body[:first_end] + b"\0" * 4 + body[first_end:]),
        "trailing bytes": _join(header, body + b"\0" * 8),
        "gap before the first": _join(_shifted(header, 8), b"\0" * 8 + body),
    }


@pytest.mark.parametrize("case", ["inserted bytes", "gap between tensors", "trailing bytes", "gap before the first"])
def test_safetensors_data_must_be_covered_like_the_reference(tmp_path: Path, case: str) -> None:
    path = tmp_path / "m.safetensors"
    st_torch.save_file(SD, str(path))
    with TensorDeserializer(path) as d:  # the untouched file loads
        for k, v in SD.items():
            assert_same(d[k], v, k)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_safetensors_variants(path.read_bytes())[case])
    with pytest.raises(Exception, match=r"invalid offset|not fully covered"):
        st_torch.load_file(str(bad))  # the reference refuses it...
    with pytest.raises(FormatError, match="cover"):
        TensorDeserializer(bad)  # ...and so do we, instead of loading shifted tensors


# ---- upstream tensorizer: empty index, unknown feature flags ----------------------------------------------


def _upstream(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "u.tensors") -> bytes:
    s = tensorizer.TensorSerializer(str(tmp_path / name))
    s.write_state_dict(sd)
    s.close()
    return (tmp_path / name).read_bytes()


def _upstream_refuses(path: Path) -> None:
    with pytest.raises(ValueError):
        tensorizer.TensorDeserializer(str(path), device="cpu")


def test_upstream_empty_index_is_refused(tmp_path: Path) -> None:
    data = bytearray(_upstream(tmp_path, SD))
    struct.pack_into("<Q", data, 5 + 4 + 32 + 8 + 8, 0)  # tensor_count = 0: the index then reads as empty
    path = tmp_path / "empty.tensors"
    path.write_bytes(bytes(data))
    _upstream_refuses(path)
    with pytest.raises(FormatError, match="empty"):
        TensorDeserializer(path)


@pytest.mark.parametrize("version", [1, 2, 4, 5])
def test_upstream_unknown_feature_flags_are_refused_in_every_version(tmp_path: Path, version: int) -> None:
    data = bytearray(_upstream(tmp_path, SD))
    assert struct.unpack_from("<I", data, 5)[0] in (1, 2, 4, 5)  # plain files: no encryption flags, no long dims
    struct.pack_into("<I", data, 5, version)
    data[9 + 4] |= 0x01  # bit 34 of the 256-bit flags field: unknown to upstream and to us
    path = tmp_path / "flags.tensors"
    path.write_bytes(bytes(data))
    _upstream_refuses(path)
    with pytest.raises(UnsupportedVersionError, match="feature flags"):
        TensorDeserializer(path)


# ---- no encryption downgrade with the key in the environment ---------------------------------------------


def _strip_encryption(data: bytes) -> bytes:
    """Our encrypted file rewritten as a plain one: encryption section and flag gone, ciphertext kept."""
    from hf_tensorizer.format.index import FEATURE_ENCRYPTED

    def strip(doc: dict) -> None:
        doc.pop("encryption", None)
        for e in doc["tensors"]:
            e.pop("crypt", None)
            e.pop("digests", None)
        doc["digest"] = "none"

    out = with_index(data, strip)
    features = preamble_field(out, "required_features") & ~FEATURE_ENCRYPTED
    out = bytearray(patch_preamble(out, required_features=features))
    out[SHA_OFFSET + 32 : SHA_OFFSET + 64] = bytes(32)  # the auth tag
    return bytes(out)


def test_env_key_is_never_silently_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = EncryptionKey.generate()
    enc = tmp_path / "enc.tensors"
    with TensorSerializer(enc, encryption=key) as s:
        s.write_state_dict(SD)
    stripped = tmp_path / "stripped.tensors"
    stripped.write_bytes(_strip_encryption(enc.read_bytes()))
    assert not read_index(stripped).encrypted
    monkeypatch.delenv(KEY_ENV, raising=False)
    with TensorDeserializer(stripped) as d:  # without a configured key it is just a plain file (of ciphertext)
        assert not torch.equal(d["a"], SD["a"])
    monkeypatch.setenv(KEY_ENV, key.to_text())
    with TensorDeserializer(enc) as d:  # the configured key opens the real file
        assert_same(d["a"], SD["a"])
    for path in (stripped, _plain(tmp_path)):
        with pytest.raises(DecryptionError, match=KEY_ENV):
            TensorDeserializer(path)  # configured key, file not encrypted: refused, whatever the file holds
    with TensorDeserializer(_plain(tmp_path), encryption=False) as d:  # a plain file, on purpose
        assert_same(d["a"], SD["a"])
    with pytest.raises(MissingKeyError):
        TensorDeserializer(enc, encryption=False)
    back = convert(_plain(tmp_path), tmp_path / "copy.tensors", write_key=key)  # encrypt a plain file: still fine
    assert back.encrypted


def _plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.tensors"
    if not path.exists():
        with TensorSerializer(path) as s:
            s.write_state_dict(SD)
    return path


def test_env_key_refuses_plain_upstream_and_safetensors_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, EncryptionKey.generate().to_text())
    up = tmp_path / "u.tensors"
    _upstream(tmp_path, SD)
    sf = tmp_path / "m.safetensors"
    st_torch.save_file(SD, str(sf))
    for path in (up, sf):
        with pytest.raises(DecryptionError, match=KEY_ENV):
            TensorDeserializer(path)
        with TensorDeserializer(path, encryption=False) as d:
            assert_same(d["a"], SD["a"])


# ---- key derivation cost bounded before it runs ----------------------------------------------------------


HOSTILE = [(MAX_OPSLIMIT + 1, 8 << 20, "opslimit"), (1, MAX_MEMLIMIT + (1 << 20), "memlimit"),
           (16, 4 << 30, "opslimit")]  # fmt: skip


def test_documented_kdf_maxima() -> None:
    import nacl.pwhash.argon2id as argon

    assert (MAX_OPSLIMIT, MAX_MEMLIMIT) == (argon.OPSLIMIT_SENSITIVE, argon.MEMLIMIT_SENSITIVE)
    Passphrase("pw", opslimit=MAX_OPSLIMIT, memlimit=MAX_MEMLIMIT)  # the highest preset is still writable
    for ops, mem, what in HOSTILE:
        with pytest.raises(UsageError, match=what):  # the writer enforces the same caps
            Passphrase("pw", opslimit=ops, memlimit=mem)


@pytest.mark.parametrize(("ops", "mem", "what"), HOSTILE)
def test_hostile_kdf_header_fails_fast(tmp_path: Path, ops: int, mem: int, what: str) -> None:
    path = tmp_path / "pw.tensors"
    with TensorSerializer(path, encryption=Passphrase("pw", opslimit=1, memlimit=8 << 20)) as s:
        s.write_state_dict(SD)

    def hostile(doc: dict) -> None:
        doc["encryption"]["kdf"].update(opslimit=ops, memlimit=mem)

    bad = tmp_path / "bad.tensors"
    bad.write_bytes(with_index(path.read_bytes(), hostile))
    t = time.perf_counter()
    with pytest.raises(DecryptionError, match=what):
        TensorDeserializer(bad, encryption=Passphrase("pw"))
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize(("ops", "mem", "what"), HOSTILE)
def test_hostile_upstream_kdf_fails_fast(tmp_path: Path, ops: int, mem: int, what: str) -> None:
    lim = EncryptionParams
    ep = EncryptionParams.from_string("pw", opslimit=lim.OpsLimit.MIN, memlimit=lim.MemLimit.MIN)
    s = tensorizer.TensorSerializer(str(tmp_path / "u.tensors"), encryption=ep)
    s.write_state_dict(SD)
    s.close()
    data = (tmp_path / "u.tensors").read_bytes()
    old = struct.pack("<QQ", int(lim.OpsLimit.MIN), int(lim.MemLimit.MIN))
    assert data.count(old) == len(SD)  # one key-derivation record per tensor
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(data.replace(old, struct.pack("<QQ", ops, mem)))
    t = time.perf_counter()
    with pytest.raises(DecryptionError, match=what):
        TensorDeserializer(bad, encryption=Passphrase("pw"))
    assert time.perf_counter() - t < 1.0
