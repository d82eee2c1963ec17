"""The artifact manifest and a pipeline's model_index.json, as a hostile server would send them: parsed into
safe relative paths or refused with FormatError, never written outside the cache folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer.errors import FormatError
from hf_tensorizer.integrations.artifact import cache as artifact_cache
from hf_tensorizer.integrations.artifact import manifest
from hf_tensorizer.integrations.loading import weights

HEADER = {"format": manifest.ARTIFACT_FORMAT, "version": manifest.ARTIFACT_VERSION, "library": "transformers"}


def _manifest(files: Any) -> bytes:
    return json.dumps({**HEADER, "files": files}).encode()


def _inside(base: str, name: str) -> bool:
    path = os.path.realpath(os.path.join(base, name))
    return path.startswith(base + os.sep) and os.path.basename(path) not in (
        manifest.MANIFEST_NAME,
        manifest.REMOTE_MARKER,
    )


# path-like text built from the characters that make traversal and confusion possible
_part = st.text(alphabet=st.sampled_from(list("ab.-_/\\:~ \x00\n\u00e9\u2024")), max_size=8)
_names = st.one_of(_part, st.sampled_from(["..", ".", "", "/", "a/../..", "/etc/passwd", "C:\\x", "a//b", "./a"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(files=st.lists(st.one_of(_names, json_values), max_size=6))
def test_files_are_safe_paths_or_refused(files: list[Any]) -> None:
    base = os.path.realpath("/tmp/cache-root")
    try:
        parsed = manifest.parse_manifest(_manifest(files))
    except FormatError:
        return
    names = parsed["files"]
    assert all(isinstance(n, str) and _inside(base, n) for n in names)
    assert len(set(names)) == len(names)
    assert not any(n.startswith(m + "/") for n in names for m in names)  # no file is also a folder


@settings(max_examples=300, deadline=None)
@given(doc=st.one_of(json_values, st.dictionaries(st.sampled_from(["format", "files", "version"]), json_values)))
def test_arbitrary_json_parses_or_raises_format_error(doc: Any) -> None:
    try:
        manifest.parse_manifest(json.dumps(doc).encode())
    except FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_format_error(raw: bytes) -> None:
    try:
        manifest.parse_manifest(raw)
    except FormatError:
        pass


def test_deeply_nested_json_is_a_format_error() -> None:
    with pytest.raises(FormatError):
        manifest.parse_manifest(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "files",
    [
        ["../escape.json"],
        ["/etc/passwd"],
        ["a/../../escape.json"],
        [".hf_tensorizer_remote"],  # would redirect the weights to a place of the server's choosing
        ["sub/hf_tensorizer.json"],
        ["config.json", "config.json"],
        ["unet", "unet/config.json"],
        "config.json",
        [7],
        ["nul\x00.json"],
        ["back\\slash.json"],
        [""],
    ],
)
def test_hostile_manifest_from_a_server_writes_nothing(
    files: Any, http_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(cache))
    art = http_server.dir / "art"
    art.mkdir()
    (art / manifest.MANIFEST_NAME).write_bytes(_manifest(files))
    (art / "config.json").write_text("{}")
    with pytest.raises(FormatError):
        artifact_cache.resolve(http_server.url("art"))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_hostile_model_index_without_manifest(
    http_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    art = http_server.dir / "pipe"
    art.mkdir()
    for body in (b"[1, 2]", b"{not json", json.dumps({"../up": ["diffusers", "UNet2DConditionModel"]}).encode()):
        (art / "model_index.json").write_bytes(body)
        with pytest.raises(FormatError):
            artifact_cache.resolve(http_server.url("pipe"))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_valid_manifest_round_trip(http_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    art = http_server.dir / "ok"
    (art / "unet").mkdir(parents=True)
    files = ["config.json", "unet/config.json", "unet/model.tensors", ".gitattributes"]
    (art / manifest.MANIFEST_NAME).write_bytes(_manifest(files))
    for f in files:
        (art / f).write_text(f)
    folder = artifact_cache.resolve(http_server.url("ok"))
    assert (Path(folder) / "unet" / "config.json").read_text() == "unet/config.json"
    assert not (Path(folder) / "unet" / "model.tensors").exists()  # weights stay remote
    assert weights.weights_uris(os.path.join(folder, "unet")) == [http_server.url("ok") + "/unet/model.tensors"]
