"""Encrypted files: keys, passphrases, round trips, composition with the loader's options, the CLI."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.cli import main as cli_main
from hf_tensorizer.constants import DEFAULT_BLOCK_SIZE, ENCRYPTED_BLOCK_SIZE, KEY_ENV
from hf_tensorizer.crypto import EncryptionKey, Passphrase
from hf_tensorizer.engine.header import read_index
from hf_tensorizer.engine.reencrypt import convert
from hf_tensorizer.errors import DecryptionError, HashMismatchError, MissingKeyError, UsageError
from hf_tensorizer.sources import Sink

FAST = {"opslimit": 1, "memlimit": 8 << 20}  # Argon2id cost for tests only


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 33)
        self.norm = torch.nn.LayerNorm(33)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scale", torch.tensor([0.5]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.norm(self.lin(h)) * self.scale, self.head(h)


def _model() -> Model:
    torch.manual_seed(0)
    return Model().eval()


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "a": torch.randn(300, 70, generator=g),
        "b": torch.randint(0, 100, (9,), generator=g),
        "c": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "big": torch.randn(3 * 4096 + 5, generator=g),
        "e": torch.empty(0),
    }


def _save(path, key, sd=None, **kw):
    with TensorSerializer(path, encryption=key, **kw) as s:
        s.write_state_dict(_sd() if sd is None else sd)
    return path


def _equal(d, sd) -> None:
    assert set(d) == set(sd)
    for k in sd:
        assert d[k].dtype == sd[k].dtype and torch.equal(d[k], sd[k]), k


@pytest.fixture
def key() -> EncryptionKey:
    return EncryptionKey.generate()


# ---- keys ----------------------------------------------------------------------------------------


def test_key_text_file_and_env_round_trip(tmp_path, monkeypatch, key):
    assert EncryptionKey.from_text(key.to_text()) == key
    assert EncryptionKey.from_text(key.raw.hex()) == key
    assert "secret" in repr(key) and key.to_text() not in repr(key)
    path = tmp_path / "k.key"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert EncryptionKey.from_file(path) == key
    with pytest.raises(UsageError):
        key.save(path)
    monkeypatch.setenv("MY_KEY", key.to_text())
    assert EncryptionKey.from_env("MY_KEY") == key
    for bad in ("", "abc", "00" * 31, "x" * 64):
        with pytest.raises(UsageError):
            EncryptionKey.from_text(bad)
    with pytest.raises(MissingKeyError):
        EncryptionKey.from_file(tmp_path / "missing.key")
    with pytest.raises(UsageError):
        EncryptionKey(b"short")
    with pytest.raises(UsageError):
        TensorSerializer(tmp_path / "x.tensors", encryption="a passphrase as str")


def test_env_var_opens_encrypted_files(tmp_path, monkeypatch, key):
    path = _save(tmp_path / "m.tensors", key)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingKeyError, match=KEY_ENV):
        TensorDeserializer(path)
    monkeypatch.setenv(KEY_ENV, key.to_text())
    with TensorDeserializer(path) as d:
        _equal(d, _sd())


# ---- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("digest", ["crc32", "sha256", "none"])
def test_round_trip_local_file(tmp_path, key, digest):
    path = _save(tmp_path / "m.tensors", key, digest=digest, block_size=4096)
    index = read_index(__import__("hf_tensorizer").sources.open_source(path))
    assert index.encrypted and index.encryption["kdf"] == {"alg": "none"}
    assert "key" not in str(index.encryption).replace("key_check", "")
    raw = path.read_bytes()
    plain_a = _sd()["a"].numpy().tobytes()
    assert plain_a[:64] not in raw  # the data really is encrypted
    for strategy in ("pread", "odirect"):  # scatter reads into tensors, and the staged path
        with TensorDeserializer(path, encryption=key, strategy=strategy, verify_hash=True) as d:
            _equal(d, _sd())


def test_default_block_size_for_encrypted_files(tmp_path, key):
    with TensorSerializer(tmp_path / "p.tensors") as s:
        s.write_tensor("x", torch.zeros(4))
    assert s.index.block_size == DEFAULT_BLOCK_SIZE
    with TensorSerializer(tmp_path / "e.tensors", encryption=key) as s:
        s.write_tensor("x", torch.zeros(4))
    assert s.index.block_size == ENCRYPTED_BLOCK_SIZE


def test_passphrase_round_trip_and_wrong_passphrase(tmp_path):
    path = _save(tmp_path / "m.tensors", Passphrase("correct horse", **FAST))
    kdf = read_index(__import__("hf_tensorizer").sources.open_source(path)).encryption["kdf"]
    assert kdf["alg"] == "argon2id13" and kdf["opslimit"] == 1 and len(kdf["salt"]) == 32
    with TensorDeserializer(path, encryption=Passphrase("correct horse")) as d:
        _equal(d, _sd())
    with pytest.raises(DecryptionError, match="wrong key or passphrase"):
        TensorDeserializer(path, encryption=Passphrase("correct horse!"))
    with pytest.raises(DecryptionError, match="passphrase"):
        TensorDeserializer(path, encryption=EncryptionKey.generate())


def test_wrong_key_missing_key_and_downgrade(tmp_path, key):
    path = _save(tmp_path / "m.tensors", key)
    with pytest.raises(DecryptionError, match="wrong key or passphrase"):
        TensorDeserializer(path, encryption=EncryptionKey.generate())
    with pytest.raises(DecryptionError, match="not a passphrase"):
        TensorDeserializer(path, encryption=Passphrase("x", **FAST))
    with pytest.raises(MissingKeyError):
        TensorDeserializer(path)
    plain = tmp_path / "plain.tensors"
    with TensorSerializer(plain) as s:
        s.write_state_dict(_sd())
    with pytest.raises(DecryptionError, match="not encrypted"):  # a plain file swapped in is refused
        TensorDeserializer(plain, encryption=key)


def test_two_files_with_one_key_do_not_share_keystream(tmp_path, key):
    a = _save(tmp_path / "a.tensors", key).read_bytes()
    b = _save(tmp_path / "b.tensors", key).read_bytes()
    index = read_index(__import__("hf_tensorizer").sources.open_source(tmp_path / "a.tensors"))
    e = index.tensors["a"]
    assert a[e.offset : e.offset + 256] != b[e.offset : e.offset + 256]


# ---- composition ----------------------------------------------------------------------------------


def test_lazy_filter_dtype_and_verify_hash_compose(tmp_path, key):
    path = _save(tmp_path / "m.tensors", key, block_size=4096)
    sd = _sd()
    with TensorDeserializer(path, encryption=key, lazy=True, filter=["big", "c"], verify_hash=True) as d:
        assert set(d) == {"big", "c"}
        assert torch.equal(d["big"], sd["big"])
        assert d.metrics.tensors == 1  # only what was touched was read and decrypted
        assert torch.equal(d["c"], sd["c"])
    with TensorDeserializer(path, encryption=key, filter=lambda n: n != "a", dtype=torch.float16) as d:
        assert "a" not in d and torch.equal(d["big"], sd["big"].half())


def test_verify_hash_checks_plaintext_after_decryption(tmp_path, key):
    """A digest edited by a key holder (header re-signed) is still caught by verify_hash, naming the tensor."""
    import dataclasses

    from hf_tensorizer.crypto.seal import open_section, sealed_header

    path = _save(tmp_path / "m.tensors", key, block_size=4096, digest="sha256")
    data = path.read_bytes()
    index = read_index(__import__("hf_tensorizer").sources.open_source(path))
    b = index.tensors["b"]
    index.tensors["b"] = dataclasses.replace(b, digests=("0" * 64,))
    path.write_bytes(sealed_header(index, open_section(index.encryption, key)) + data[index.data_offset :])
    with TensorDeserializer(path, encryption=key) as d:  # MACs fine, digests not checked
        assert torch.equal(d["b"], _sd()["b"])
    with pytest.raises(HashMismatchError, match="'b'"):
        TensorDeserializer(path, encryption=key, verify_hash=True)


def test_module_round_trip_bit_identical(tmp_path, key):
    model = _model()
    with TensorSerializer(tmp_path / "m.tensors", encryption=key) as s:
        s.write_module(model)
    with torch.device("meta"):
        fresh = Model()
    with TensorDeserializer(tmp_path / "m.tensors", encryption=key) as d:
        d.load_into_module(fresh)
    assert fresh.head.weight is fresh.emb.weight
    ids = torch.tensor([[1, 2, 3, 49]])
    for x, y in zip(model(ids), fresh.eval()(ids)):
        assert torch.equal(x, y)


class _ListSink(Sink):
    """An in-memory sink that cannot rewrite its head (like a pipe): the writer hashes and seals first."""

    uri = "memory://sink"
    can_rewrite_head = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.committed = False

    def write(self, data) -> None:
        self.parts.append(bytes(data))

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.parts.clear()


def test_sink_without_head_rewrite(tmp_path, key):
    sink = _ListSink()
    with TensorSerializer(sink, encryption=key, block_size=4096) as s:
        s.write_state_dict(_sd())
    path = tmp_path / "m.tensors"
    path.write_bytes(b"".join(sink.parts))
    with TensorDeserializer(path, encryption=key, verify_hash=True) as d:
        _equal(d, _sd())


# ---- conversion and CLI ---------------------------------------------------------------------------


def test_convert_encrypt_rekey_decrypt(tmp_path, key):
    plain = tmp_path / "plain.tensors"
    with TensorSerializer(plain, metadata={"m": "1"}) as s:
        s.write_module(_model())
    enc, rekeyed, back = tmp_path / "enc.tensors", tmp_path / "re.tensors", tmp_path / "back.tensors"
    # block sizes: each side's default when encrypting or decrypting, the source's when re-keying
    assert convert(plain, enc, write_key=key).block_size == ENCRYPTED_BLOCK_SIZE
    other = Passphrase("pw", **FAST)
    odd = tmp_path / "odd.tensors"
    assert convert(enc, odd, read_key=key, write_key=other, block_size=8192).block_size == 8192
    assert convert(odd, rekeyed, read_key=Passphrase("pw"), write_key=other).block_size == 8192
    index = convert(rekeyed, back, read_key=Passphrase("pw"))
    assert not index.encrypted and index.metadata == {"m": "1"} and index.block_size == DEFAULT_BLOCK_SIZE
    assert index.tensors["head.weight"].alias == "emb.weight"
    with TensorDeserializer(back) as d, TensorDeserializer(plain) as p:
        _equal(d, dict(p))
        assert d.kind("scale") == p.kind("scale")
    with pytest.raises(UsageError):
        convert(plain, plain, write_key=key)


def test_cli_keygen_encrypt_decrypt(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    keyfile = tmp_path / "k.key"
    assert cli_main(["keygen", str(keyfile)]) == 0
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    assert cli_main(["keygen", str(keyfile)]) == 2  # refuses to overwrite a key
    assert cli_main(["keygen"]) == 0
    EncryptionKey.from_text(capsys.readouterr().out.strip().splitlines()[-1])
    plain, enc, back = tmp_path / "p.tensors", tmp_path / "e.tensors", tmp_path / "b.tensors"
    with TensorSerializer(plain) as s:
        s.write_state_dict(_sd())
    assert cli_main(["encrypt", str(plain), str(enc), "--key-file", str(keyfile), "--block-size", "8192"]) == 0
    assert read_index(__import__("hf_tensorizer").sources.open_source(enc)).block_size == 8192
    assert cli_main(["decrypt", str(enc), str(back)]) == 2  # no key
    monkeypatch.setenv("PW", "hunter2")
    assert cli_main(["decrypt", str(enc), str(back), "--passphrase-env", "PW"]) == 2  # wrong kind of key
    assert "DecryptionError" not in capsys.readouterr().err  # a clear message, not a traceback
    assert cli_main(["decrypt", str(enc), str(back), "--key-file", str(keyfile)]) == 0
    with TensorDeserializer(back) as d:
        _equal(d, _sd())
    pw_file = tmp_path / "pw.tensors"
    assert cli_main(["encrypt", str(plain), str(pw_file), "--passphrase-env", "PW", "--opslimit", "1",
                     "--memlimit", str(8 << 20)]) == 0  # fmt: skip
    with TensorDeserializer(pw_file, encryption=Passphrase("hunter2")) as d:
        _equal(d, _sd())


# ---- S3 ----------------------------------------------------------------------------------------------


def test_s3_round_trip_and_tamper(moto_s3, s3_bucket, s3_client, key):
    """Written through the S3 sink (multipart, head rewritten at the end), read back with ranged GETs."""
    uri = f"s3://{s3_bucket}/enc/model.tensors"
    with TensorSerializer(uri, encryption=key, block_size=4096, endpoint_url=moto_s3) as s:
        s.write_state_dict(_sd())
    with TensorDeserializer(uri, encryption=key, verify_hash=True, endpoint_url=moto_s3) as d:
        _equal(d, _sd())
    with TensorDeserializer(uri, encryption=key, lazy=True, filter=["big"], endpoint_url=moto_s3) as d:
        assert torch.equal(d["big"], _sd()["big"])
    body = bytearray(s3_client.get_object(Bucket=s3_bucket, Key="enc/model.tensors")["Body"].read())
    big = read_index(__import__("hf_tensorizer").sources.open_source(uri, endpoint_url=moto_s3)).tensors["big"]
    body[big.offset + big.length - 1] ^= 1  # the last byte of a tensor's ciphertext
    s3_client.put_object(Bucket=s3_bucket, Key="enc/model.tensors", Body=bytes(body))
    with pytest.raises(DecryptionError):
        TensorDeserializer(uri, encryption=key, endpoint_url=moto_s3)
    with pytest.raises(DecryptionError, match="wrong key"):
        TensorDeserializer(uri, encryption=EncryptionKey.generate(), endpoint_url=moto_s3)


def test_sealing_into_a_reused_buffer_gives_the_same_block(key):
    from hf_tensorizer.crypto.keys import as_key_source
    from hf_tensorizer.crypto.seal import MAC_BYTES, FileSealer
    from hf_tensorizer.errors import EncryptionError

    sealer = FileSealer(as_key_source(key), 8192)
    buf = bytearray(8192 + MAC_BYTES)
    for n in (8192, 100, 0):  # a shorter block leaves the rest of the buffer out of the ciphertext
        plain = memoryview(bytes(range(256)) * 32)[:n]
        fresh = sealer.seal("t", 3, plain)
        ct, mac = sealer.seal("t", 3, plain, buf)
        assert (bytes(ct), mac) == (bytes(fresh[0]), fresh[1]) and len(ct) == n
    with pytest.raises(EncryptionError, match="too small"):
        sealer.seal("t", 0, memoryview(bytes(100)), bytearray(50))


def test_large_encrypted_save_reusing_buffers_round_trips(tmp_path, key):
    """Enough blocks for the writer's worker threads to reuse sealing buffers (a file sink copies what it is
    given); a sink that may keep references gets fresh buffers. Both files open and verify."""
    g = torch.Generator().manual_seed(9)
    sd = {f"w{i}": torch.randn(3_000_000 + 17 * i, generator=g) for i in range(4)}  # 48 MiB: threaded pipeline
    with TensorSerializer(tmp_path / "e.tensors", encryption=key, block_size=1 << 20) as s:
        s.write_state_dict(sd)
    sink = _ListSink()
    assert not sink.copies_writes
    with TensorSerializer(sink, encryption=key, block_size=1 << 20) as s:
        s.write_state_dict(sd)
    (tmp_path / "l.tensors").write_bytes(b"".join(sink.parts))
    for name in ("e.tensors", "l.tensors"):
        with TensorDeserializer(tmp_path / name, encryption=key, verify_hash=True) as d:
            _equal(d, sd)
