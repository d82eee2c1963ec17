"""A small local Hugging Face Hub for tests: enough of the API for huggingface_hub's downloads and uploads.

Two listeners on 127.0.0.1, each a ``ThreadingHTTPServer`` in a daemon thread of the test process:

* the Hub itself (:attr:`HubServer.endpoint`):
    * ``HEAD``/``GET /[datasets/|spaces/]{org}/{name}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag``
      (git blob sha1), ``Content-Length``, ``Range`` (206); files of ``lfs_threshold`` bytes or more answer
      ``302`` to the CDN with ``X-Linked-Size`` / ``X-Linked-Etag`` (sha256), like huggingface.co;
    * ``GET /api/{type}s/{repo}[/revision/{rev}]`` (``repo_info``), ``GET /api/{type}s/{repo}/tree/{rev}``
      (``list_repo_files``), ``POST /api/repos/create`` (``create_repo``), ``POST /api/validate-yaml`` (accepts
      every model card),
      ``POST /api/{type}s/{repo}/preupload/{rev}`` (always answers ``"regular"``, so uploads need neither LFS nor
      Xet) and ``POST /api/{type}s/{repo}/commit/{rev}`` (ndjson ``file`` / ``deletedFile`` operations);
    * errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the Hub does.
* a "CDN" on another port (another origin, so clients must not forward the token):
  ``GET /blobs/{sha256}?sig=N`` with Range and ETag; :meth:`HubServer.expire_signatures` makes earlier signed
  URLs answer 403.

Storage: ``{root}/{type}s/{org}/{name}/{commit}/{path}`` (one directory per commit, hard links into
``{root}/blobs/{sha256}``).

Pointing clients at it: huggingface_hub reads ``HF_ENDPOINT`` once, at import. hf_tensorizer reads it when a
source or sink is opened, so for hf_tensorizer ``monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)`` is enough; for
direct huggingface_hub calls pass ``endpoint=hub.endpoint`` (``HfApi(endpoint=...)``, ``hf_hub_download(...,
endpoint=...)``). Third-party code that relies on the default (transformers' ``from_pretrained``) additionally
needs ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` patched: the ``hub_server``
fixture in ``tests/conftest.py`` does all three.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with these bytes (the Hub's ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Blob:
    sha256: str
    sha1: str
    size: int


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)


class HubServer:
    """The local Hub. Use :meth:`create_repo` and :meth:`commit` to set up repositories directly.

    Args:
        root: storage directory.
        token: the token that grants access to private repos and writes (None: writes need no token).
        lfs_threshold: files of at least this many bytes are served through the CDN redirect.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, token: str | None = "hf_test_token", lfs_threshold: int = 1 << 20
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.log: list[dict[str, Any]] = []
        self.cdn_log: list[dict[str, Any]] = []
        self._secret = os.urandom(16)
        self._counter = itertools.count()
        self._api = _Server(("127.0.0.1", 0), _HubHandler, self)
        self._cdn = _Server(("127.0.0.1", 0), _CdnHandler, self)
        self.endpoint = f"http://127.0.0.1:{self._api.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            for s in (self._api, self._cdn)
        ]
        for t in self._threads:
            t.start()

    # --- setup helpers -------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """An empty repository with a ``main`` branch holding one initial commit."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = _Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            sha = self._new_commit_sha(repo_id, "")
            repo.commits[sha] = {}
            repo.branches["main"] = sha
            self._commit_dir(repo, sha).mkdir(parents=True, exist_ok=True)

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        repo_type: str = "model",
        deletions: tuple[str, ...] = (),
    ) -> str:
        """Commit ``files`` on top of ``branch``; returns the new commit sha."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            parent = repo.branches[branch]
            tree = dict(repo.commits[parent])
            for path in deletions:
                tree.pop(path, None)
            for path, data in files.items():
                tree[path] = self._store_blob(data)
            sha = self._new_commit_sha(repo_id, parent)
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            directory = self._commit_dir(repo, sha)
            for path, blob in tree.items():
                target = directory / path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.root / "blobs" / blob.sha256, target)
                except OSError:
                    shutil.copyfile(self.root / "blobs" / blob.sha256, target)
            return sha

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        """The commit ``branch`` points to."""
        with self.lock:
            return self.repos[(repo_type, repo_id)].branches[branch]

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """The bytes of ``path`` at ``revision`` (a branch or a commit)."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            sha = repo.branches.get(revision, revision)
            return (self._commit_dir(repo, sha) / path).read_bytes()

    def expire_signatures(self) -> None:
        """CDN URLs handed out so far answer 403 from now on (like expired signed URLs)."""
        with self.lock:
            self._secret = os.urandom(16)

    def stop(self) -> None:
        """Shut both listeners down."""
        for server in (self._api, self._cdn):
            server.shutdown()
            server.server_close()

    # --- internals -----------------------------------------------------------------------------------------

    def _new_commit_sha(self, repo_id: str, parent: str) -> str:
        return hashlib.sha1(f"{repo_id}:{parent}:{next(self._counter)}:{os.urandom(8).hex()}".encode()).hexdigest()

    def _commit_dir(self, repo: _Repo, sha: str) -> Path:
        return self.root / f"{repo.repo_type}s" / repo.repo_id / sha

    def _store_blob(self, data: bytes) -> _Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return _Blob(sha256, git_blob_sha1(data), len(data))

    def sign(self, sha256: str) -> str:
        with self.lock:
            return hmac.new(self._secret, sha256.encode(), "sha256").hexdigest()[:32]

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: HubServer) -> None:
        super().__init__(address, handler)
        self.hub = hub


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra)

    def _serve_file(self, path: Path, etag: str, headers: dict[str, str]) -> None:
        size = path.stat().st_size
        headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes"}
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", etag):
            self._send(412, b"", headers)
            return
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip()) if rng else None
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _CdnHandler(_Base):
    def do_GET(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        with hub.lock:
            hub.cdn_log.append(
                {
                    "method": self.command,
                    "path": split.path,
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization") is not None,
                }
            )
        m = re.fullmatch(r"/blobs/([0-9a-f]{64})", split.path)
        if not m or not hub.blob_path(m.group(1)).exists():
            self._send(404, b"no such blob")
            return
        sig = parse_qs(split.query).get("sig", [""])[0]
        if not hmac.compare_digest(sig, hub.sign(m.group(1))):
            self._send(403, b"signature expired")
            return
        self._serve_file(hub.blob_path(m.group(1)), f'"{m.group(1)}"', {})

    do_HEAD = do_GET


class _HubHandler(_Base):
    # --- routing -------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        path = split.path
        with hub.lock:
            hub.log.append(
                {"method": self.command, "path": path, "auth": self.headers.get("Authorization") is not None}
            )
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if path == "/api/repos/create" and self.command == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and self.command == "POST":
            # huggingface_hub checks a README's metadata here before a commit; every card is accepted
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(
            r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)(?:/(.*))?)?", path
        )
        if m:
            repo_type, repo_id, action, rest = _TYPES[m.group(1)], m.group(2), m.group(3), m.group(4) or ""
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return None
            if action in (None, "revision") and self.command == "GET":
                return self._info(repo, unquote(rest) if action else "main")
            if action == "tree" and self.command == "GET":
                return self._tree(repo, unquote(rest.split("/", 1)[0]) if rest else "main")
            if action == "preupload" and self.command == "POST":
                return self._preupload(repo, json.loads(body or b"{}"))
            if action == "commit" and self.command == "POST":
                return self._commit(repo, unquote(rest), body)
            return self._error(404, None, "unknown API route")
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and self.command in ("GET", "HEAD"):
            repo_type = _TYPES[m.group(1)] if m.group(1) else "model"
            repo = self._repo(repo_type, m.group(2))
            if repo is None:
                return None
            return self._resolve(repo, unquote(m.group(3)), unquote(m.group(4)))
        return self._error(404, None, "not found")

    # --- helpers -------------------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.server.hub.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        hub = self.server.hub
        with hub.lock:
            repo = hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            # The Hub answers 401 for private repos without a valid token, 404 for missing ones: both RepoNotFound
            self._error(401 if repo is not None else 404, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _commit_of(self, repo: _Repo, revision: str) -> str | None:
        with self.server.hub.lock:
            if revision in repo.branches:
                return repo.branches[revision]
            if _SHA_RE.fullmatch(revision) and revision in repo.commits:
                return revision
        return None

    # --- endpoints -----------------------------------------------------------------------------------------

    def _resolve(self, repo: _Repo, revision: str, path: str) -> None:
        hub = self.server.hub
        sha = self._commit_of(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        with hub.lock:
            blob = repo.commits[sha].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha}
        if blob.size >= hub.lfs_threshold:
            location = f"{hub.cdn}/blobs/{blob.sha256}?sig={hub.sign(blob.sha256)}"
            headers.update(
                {
                    "Location": location,
                    "X-Linked-Size": str(blob.size),
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "ETag": f'"{blob.sha1}"',
                }
            )
            return self._send(302, b"", headers)
        return self._serve_file(hub._commit_dir(repo, sha) / path, f'"{blob.sha1}"', headers)

    def _info(self, repo: _Repo, revision: str) -> None:
        sha = self._commit_of(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        with self.server.hub.lock:
            files = sorted(repo.commits[sha])
        return self._json(
            200,
            {"id": repo.repo_id, "sha": sha, "private": repo.private, "siblings": [{"rfilename": f} for f in files]},
        )

    def _tree(self, repo: _Repo, revision: str) -> None:
        sha = self._commit_of(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        with self.server.hub.lock:
            tree = dict(repo.commits[sha])
        return self._json(
            200, [{"type": "file", "path": p, "size": b.size, "oid": b.sha1} for p, b in sorted(tree.items())]
        )

    def _create_repo(self, payload: dict[str, Any]) -> None:
        hub = self.server.hub
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        try:
            hub.create_repo(
                repo_id,
                repo_type=repo_type,
                private=payload.get("visibility") == "private" or bool(payload.get("private")),
            )
        except ValueError:
            return self._error(409, None, "You already created this model repo", {})
        return self._json(200, {"url": f"{hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}", "name": repo_id})

    def _preupload(self, repo: _Repo, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in payload.get("files", [])
        ]
        return self._json(200, {"files": files, "commitOid": None})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> None:
        hub = self.server.hub
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        files: dict[str, bytes] = {}
        deletions: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deletions.append(item["value"]["path"])
            elif item["key"] != "header":
                return self._error(400, None, f"unsupported commit operation {item['key']!r}")
        sha = hub.commit(repo.repo_id, files, branch=revision, repo_type=repo.repo_type, deletions=tuple(deletions))
        url = f"{hub.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{sha}"
        return self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})
