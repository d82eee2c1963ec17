"""One version per artifact: the manifest records the version each file was committed as, and a load opens every
file at it (versioned S3 bucket: the recorded version; elsewhere an ETag change fails, naming the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integration_api import _llama, _logits  # noqa: E402

import hf_tensorizer  # noqa: E402
from hf_tensorizer.errors import FormatError, ObjectChangedError  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME, parse_manifest, write_manifest  # noqa: E402

AUTO = transformers.AutoModelForCausalLM


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))


def _manifest(s3_client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}")["Body"].read())


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
@pytest.mark.parametrize("changed", ["config.json", "model.tensors"])
def test_s3_overwrite_after_save(versioned: bool, changed: str, moto_s3: str, s3_client: Any, s3_bucket: str,
                                 tmp_path: Path) -> None:  # fmt: skip
    if versioned:
        s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    ref = _llama()
    uri, opts = f"s3://{s3_bucket}/m", {"endpoint_url": moto_s3}
    hf_tensorizer.save_pretrained(ref, uri, tensorizer_options=opts)
    versions = _manifest(s3_client, s3_bucket, "m")["versions"]
    assert set(versions) == {"config.json", "generation_config.json", "model.tensors"}
    for name, record in versions.items():
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"m/{name}")
        assert record["etag"] == head["ETag"]
        assert record.get("version_id") == (head["VersionId"] if versioned else None)
    # another save's file lands under the same name (a concurrent push, a half-finished re-upload)
    other = _llama(seed=1)
    other.config.rms_norm_eps = 0.5
    hf_tensorizer.save_pretrained(other, tmp_path / "other")
    s3_client.put_object(Bucket=s3_bucket, Key=f"m/{changed}", Body=(tmp_path / "other" / changed).read_bytes())
    if versioned:  # the recorded version of every file still loads
        loaded = hf_tensorizer.from_pretrained(AUTO, uri, tensorizer_options=opts)
        assert loaded.config.rms_norm_eps == ref.config.rms_norm_eps
        assert torch.equal(_logits(ref), _logits(loaded))
    else:
        with pytest.raises(ObjectChangedError, match=rf"s3://{s3_bucket}/m/{changed} changed after"):
            hf_tensorizer.from_pretrained(AUTO, uri, tensorizer_options=opts)


def test_http_etag_change(tmp_path: Path, http_server: Any) -> None:
    """An artifact served over HTTP whose manifest records the ETags: a file served with another ETag fails."""
    import urllib.request

    ref = _llama()
    hf_tensorizer.save_pretrained(ref, http_server.dir)
    manifest = json.loads((http_server.dir / MANIFEST_NAME).read_text())
    assert "versions" not in manifest  # a local folder keeps no versions
    etags = {}
    for name in manifest["files"]:
        with urllib.request.urlopen(urllib.request.Request(http_server.url(name), method="HEAD")) as resp:
            etags[name] = {"etag": resp.headers["ETag"]}
    (http_server.dir / MANIFEST_NAME).write_bytes(write_manifest(manifest["files"], "transformers", versions=etags))
    base = http_server.url("").rstrip("/")
    assert torch.equal(_logits(ref), _logits(hf_tensorizer.from_pretrained(AUTO, base)))
    hf_tensorizer.save_pretrained(_llama(seed=1), tmp_path / "other")
    for changed in ("model.tensors", "config.json"):
        original = (http_server.dir / changed).read_bytes()
        (http_server.dir / changed).write_bytes((tmp_path / "other" / changed).read_bytes())
        with pytest.raises(ObjectChangedError, match=rf"{changed} changed after its artifact was written"):
            hf_tensorizer.from_pretrained(AUTO, base)
        (http_server.dir / changed).write_bytes(original)  # new inode/mtime: still another ETag
        with pytest.raises(ObjectChangedError, match=changed):
            hf_tensorizer.from_pretrained(AUTO, base)
        (http_server.dir / MANIFEST_NAME).write_bytes(write_manifest(manifest["files"], "transformers"))
        assert torch.equal(_logits(ref), _logits(hf_tensorizer.from_pretrained(AUTO, base)))  # no record: latest
        (http_server.dir / MANIFEST_NAME).write_bytes(write_manifest(manifest["files"], "transformers", versions=etags))


def test_hub_sink_records_commits(hub_server: Any) -> None:
    """Written file by file to the Hub (``hf://`` destination), each file's commit is recorded and loaded."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("me/art")
    ref = _llama()
    uri, opts = "hf://me/art", {"token": hub_server.token}
    hf_tensorizer.save_pretrained(ref, uri, tensorizer_options=opts)
    manifest = json.loads(Path(api.hf_hub_download("me/art", MANIFEST_NAME)).read_text())
    commits = {name: v["commit"] for name, v in manifest["versions"].items()}
    assert set(commits) == {"config.json", "generation_config.json", "model.tensors"}
    assert all(len(c) == 40 for c in commits.values())
    # config.json overwritten in a later commit: the load reads the recorded one
    api.upload_file(path_or_fileobj=b'{"model_type": "gpt2"}', path_in_repo="config.json", repo_id="me/art")
    loaded = hf_tensorizer.from_pretrained(AUTO, uri, tensorizer_options=opts)
    assert torch.equal(_logits(ref), _logits(loaded))


@pytest.mark.parametrize(
    "versions, message",
    [
        ([], "must map file paths"),
        ({"other.json": {"etag": "x"}}, "does not list"),
        ({"config.json": {}}, "non-empty strings"),
        ({"config.json": {"etag": 3}}, "non-empty strings"),
        ({"config.json": {"md5": "x"}}, "non-empty strings"),
    ],
)
def test_manifest_versions_checked(versions: Any, message: str) -> None:
    doc = json.loads(write_manifest(["config.json"], "transformers"))
    doc["versions"] = versions
    with pytest.raises(FormatError, match=message):
        parse_manifest(json.dumps(doc).encode())
    ok = write_manifest(["config.json"], "transformers", versions={"config.json": {"etag": '"a"', "commit": "b"}})
    assert parse_manifest(ok)["versions"] == {"config.json": {"etag": '"a"', "commit": "b"}}
