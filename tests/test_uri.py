"""URI parsing: hf://, s3://, the generic opener and redaction, with property-based tests."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer.errors import InvalidURIError
from hf_tensorizer.sources import looks_like_uri, open_sink, redact, scheme_of
from hf_tensorizer.sources.hub_repo import HfURI, format_hf_uri, parse_hf_uri
from hf_tensorizer.sources.s3 import parse_s3_uri
from hf_tensorizer.sources.uri import is_native

pytestmark = pytest.mark.timeout(60)

# --- strategies ----------------------------------------------------------------------------------------------

_WORD = string.ascii_letters + string.digits + "_"
names = (
    st.tuples(st.sampled_from(_WORD), st.text(_WORD + ".-", max_size=20), st.sampled_from(_WORD))
    .map(lambda t: t[0] + t[1] + t[2])
    .filter(lambda s: "--" not in s and ".." not in s and not s.endswith(".git"))
) | st.sampled_from(_WORD)
# any text but separators the URI grammar reserves in a path
segment = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#\\"), min_size=1, max_size=12)
segments = st.lists(segment.filter(lambda s: s not in (".", "..")), min_size=1, max_size=4)
revisions = (
    st.none()
    | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
    | st.builds(lambda n: f"refs/pr/{n}", st.integers(0, 10_000))
)
repo_types = st.sampled_from(["model", "dataset", "space"])


# --- hf:// ---------------------------------------------------------------------------------------------------


def test_hf_examples():
    assert parse_hf_uri("hf://org/repo/path/to/model.tensors") == HfURI("org/repo", None, "path/to/model.tensors")
    assert tuple(parse_hf_uri("hf://org/repo@v1.0/w.bin")) == ("org/repo", "v1.0", "w.bin")
    repo_id, revision, path = parse_hf_uri("hf://org/repo@refs/pr/3/sub/w.bin")
    assert (repo_id, revision, path) == ("org/repo", "refs/pr/3", "sub/w.bin")
    assert parse_hf_uri("hf://org/repo@feature%2Fx/w.bin").revision == "feature/x"
    assert parse_hf_uri("hf://datasets/org/data/train.bin").repo_type == "dataset"
    assert parse_hf_uri("hf://spaces/org/app@main").path == ""
    assert parse_hf_uri("hf://org/repo/dir/file@2.bin") == HfURI("org/repo", None, "dir/file@2.bin")
    assert parse_hf_uri("HF://org/repo/x").repo_id == "org/repo"


@pytest.mark.parametrize(
    "bad",
    [
        "hf://",
        "hf://repo-only",
        "hf://org/",
        "hf://org/repo@/x",
        "hf://org/re--po/x",
        "hf://org/.repo/x",
        "hf://org/repo.git/x",
        "hf://org/repo//x",
        "hf://org/repo/a/../b",
        "hf://org/repo/x?download=1",
        "hf://buckets/org/b/x",
        "s3://org/repo/x",
        "hf://or g/repo/x",
    ],
)
def test_hf_malformed(bad):
    with pytest.raises(InvalidURIError):
        parse_hf_uri(bad)


def test_hf_require_path():
    assert parse_hf_uri("hf://org/repo").path == ""
    with pytest.raises(InvalidURIError, match="names a repository, not a file"):
        parse_hf_uri("hf://org/repo@main", require_path=True)


@settings(max_examples=300, deadline=None)
@given(org=names, name=names, revision=revisions, path=st.none() | segments, repo_type=repo_types)
def test_hf_roundtrip(org, name, revision, path, repo_type):
    repo_id = f"{org}/{name}"
    if len(repo_id) > 96:
        return
    path_text = "/".join(path) if path else ""
    uri = format_hf_uri(repo_id, path_text, revision, repo_type)
    assert parse_hf_uri(uri) == HfURI(repo_id, revision, path_text, repo_type)


@settings(max_examples=300, deadline=None)
@given(org=names, name=names, revision=revisions, path=st.none() | segments, repo_type=repo_types)
def test_hf_agrees_with_huggingface_hub(org, name, revision, path, repo_type):
    """Our parser follows huggingface_hub's canonical grammar (where that version of huggingface_hub has one)."""
    hub_uris = pytest.importorskip("huggingface_hub.utils._hf_uris")
    repo_id = f"{org}/{name}"
    if len(repo_id) > 96:
        return
    uri = format_hf_uri(repo_id, "/".join(path) if path else "", revision, repo_type)
    theirs = hub_uris.parse_hf_uri(uri)
    ours = parse_hf_uri(uri)
    assert (theirs.type, theirs.id, theirs.revision, theirs.path_in_repo) == (
        ours.repo_type,
        ours.repo_id,
        ours.revision,
        ours.path,
    )


@settings(max_examples=500, deadline=None)
@given(body=st.text(max_size=60))
def test_hf_arbitrary_text_parses_or_raises_invalid_uri(body):
    try:
        parsed = parse_hf_uri("hf://" + body)
    except InvalidURIError:
        return
    # whatever is accepted formats back to an equivalent URI
    again = parse_hf_uri(format_hf_uri(parsed.repo_id, parsed.path, parsed.revision, parsed.repo_type))
    assert again == parsed


# --- s3:// ---------------------------------------------------------------------------------------------------

buckets = st.from_regex(r"[a-z0-9][a-z0-9.-]{2,40}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(bucket=buckets, key=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_s3_roundtrip(bucket, key):
    assert parse_s3_uri(f"s3://{bucket}/{key}") == (bucket, key)


@settings(max_examples=500, deadline=None)
@given(body=st.text(max_size=40))
def test_s3_arbitrary_text_parses_or_raises_invalid_uri(body):
    try:
        bucket, key = parse_s3_uri("s3://" + body)
    except InvalidURIError:
        return
    assert body in (f"{bucket}/{key}", bucket if not key else None)


@pytest.mark.parametrize("bad", ["s3://", "s3:///key", "s3://bu cket/k", "http://bucket/key", "s3:/bucket/key"])
def test_s3_malformed(bad):
    with pytest.raises(InvalidURIError):
        parse_s3_uri(bad)


# --- the opener and redaction --------------------------------------------------------------------------------


def test_scheme_of():
    assert scheme_of("/tmp/x") == "file"
    assert scheme_of("file:///tmp/x") == "file"
    assert scheme_of("HTTPS://h/x") == "https"
    assert scheme_of("s3://b/k") == "s3"
    assert scheme_of("hf://o/r/x") == "hf"
    with pytest.raises(InvalidURIError, match="unsupported URI scheme"):
        scheme_of("nope://h/x")


def test_fsspec_schemes():
    """Protocols fsspec knows (built in or registered) are schemes too; ours stay ours."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    assert scheme_of("gs://b/k") == "gs"
    assert scheme_of("AZ://c/k") == "az"
    assert scheme_of("memory://x/y") == "memory"
    assert scheme_of("ftp://h/x") == "ftp"
    assert scheme_of("simplecache::gs://b/k") == "simplecache"
    assert looks_like_uri("gs://b/model") and looks_like_uri("s3://b/k")
    assert not looks_like_uri("nope://b/k") and not looks_like_uri("/tmp/x")
    assert is_native("s3") and is_native("hf") and not is_native("gs")
    with pytest.raises(InvalidURIError):
        scheme_of("hf::gs://b/k")  # a chain must start with a wrapper protocol
    with pytest.raises(InvalidURIError):
        scheme_of("test-proto-xyz://a/b")
    fsspec.register_implementation("test-proto-xyz", MemoryFileSystem, clobber=True)
    assert scheme_of("test-proto-xyz://a/b") == "test-proto-xyz"


def test_http_cannot_be_a_sink():
    with pytest.raises(InvalidURIError, match="not supported"):
        open_sink("https://example.invalid/x")


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5}){0,2}", fullmatch=True)
secrets = st.text(string.ascii_letters + string.digits, min_size=8, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "s3", "hf"]),
    host=hosts,
    port=st.none() | st.integers(1, 65535),
    path=st.lists(st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8), max_size=4),
    user=st.none() | secrets,
    password=secrets,
    query=secrets,
)
def test_redact_drops_credentials_and_query(scheme, host, port, path, user, password, query):
    netloc = host + (f":{port}" if port else "")
    if user:
        netloc = f"{user}:PW{password}@{netloc}"
    uri = f"{scheme}://{netloc}/{'/'.join(path)}?sig=Q{query}"
    shown = redact(uri)
    assert f"PW{password}" not in shown
    assert f"Q{query}" not in shown
    assert (user is None) or (f"{user}:" not in shown)
    assert shown.startswith(f"{scheme}://{host}")
