"""A small Hugging Face Hub-compatible HTTP server for the tests (standard library only).

It implements what the real ``huggingface_hub`` client needs to create repos, upload (regular
files in the commit, large files through the classic LFS batch API), commit to branches and pull
requests, list trees and refs, and download with the cache headers. Repositories live in memory.
Tokens are fixed: ``WRITE`` may do anything, ``READ`` may read every repository but write none.
Faults are switched on by attributes of :class:`HubState` (``fail_lfs_oids``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

WRITE = "hf_test_write_token_5f2b9c"
READ = "hf_test_read_token_81d0aa"
USERS = {WRITE: ("alice", True), READ: ("bob", False)}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> files
    branches: dict[str, str] = field(default_factory=dict)  # name -> sha
    pulls: int = 0
    lfs: dict[str, bytes] = field(default_factory=dict)  # this repo's LFS objects: sha256 -> bytes


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    regular_only: bool = False  # answer "regular" to every preupload (no LFS)
    fail_lfs_oids: set[str] = field(default_factory=set)  # answer uploads of these objects with a 500
    drop_lfs_oids: set[str] = field(default_factory=set)  # drop the connection on uploads of these objects
    lfs_puts: list[str] = field(default_factory=list)  # oids of successful LFS uploads
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- helpers ---
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _user(self) -> tuple[str, bool] | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return USERS.get(auth.removeprefix("Bearer ").strip())

    def _bad_token(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth.removeprefix("Bearer ").strip() not in USERS

    def _repo(self, repo_id: str, write: bool, head: bool = False) -> Repo | None:
        """The repo, or None after answering with the right error."""
        if self._bad_token():
            self._error(401, "Invalid credentials in Authorization header", head=head)
            return None
        repo = self.state.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and user is None):
            self._error(401 if user is None else 404, f"Repository {repo_id} not found", "RepoNotFound", head=head)
            return None
        if write and (user is None or not user[1]):
            self._error(403, f"You don't have the rights to write to {repo_id}", head=head)
            return None
        return repo

    def _resolve(self, repo: Repo, rev: str, head: bool = False) -> str | None:
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
        return sha

    @staticmethod
    def _split(path: str) -> list[str]:
        return [unquote(p) for p in path.split("/")]

    # --- dispatch ---
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        parts = self._split(url.path.strip("/"))
        self.state.requests.append(f"{method} {url.path}")
        query = parse_qs(url.query)
        try:
            with self.state.lock:
                self._route(method, parts, query, body)
        except Exception as e:  # pragma: no cover - a bug in the fixture
            self._error(500, f"test server error: {e!r}")

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if parts[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid user token.")
            return self._json(
                200,
                {"name": user[0], "type": "user", "auth": {"accessToken": {"role": "write" if user[1] else "read"}}},
            )
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body).get("content", ""))
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{parts[2]}/{parts[3]}"
            return self._api(method, repo_id, parts[4:], query, body)
        if parts[0] == "lfs-upload" and method == "PUT" and len(parts) == 4:
            return self._lfs_put(f"{parts[1]}/{parts[2]}", parts[3], body)
        if parts[0] == "lfs-verify" and method == "POST":
            return self._json(200, {})
        if len(parts) >= 3 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._download(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._error(404, f"no route for {method} /{'/'.join(parts)}")

    def _validate_yaml(self, content: str) -> None:
        """The model card's YAML header: ``key: value`` lines and ``- item`` list entries between ``---`` fences."""
        lines = content.splitlines()
        if not lines or lines[0] != "---" or "---" not in lines[1:]:
            return self._json(400, {"errors": [{"message": "no YAML metadata block"}]})
        errors = []
        for line in lines[1 : lines[1:].index("---") + 1]:
            if not (line.startswith("- ") or (":" in line and not line.startswith(" "))):
                errors.append({"message": f"cannot parse {line!r}"})
        if errors:
            return self._json(400, {"errors": errors})
        return self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, payload: dict[str, Any]) -> None:
        user = self._user()
        if self._bad_token() or user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        if not user[1]:
            return self._error(403, "You don't have the rights to create a repository")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, private)
        sha = secrets.token_hex(20)
        gitattributes = Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
        repo.commits[sha] = {".gitattributes": gitattributes}
        repo.branches["main"] = sha
        self.state.repos[repo_id] = repo
        return self._json(200, {"url": url, "name": repo_id})

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
        write = rest[:1] in (["preupload"], ["commit"], ["branch"])
        repo = self._repo(repo_id, write)
        if repo is None:
            return None
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) > 1 else "main"
            sha = self._resolve(repo, rev)
            if sha is None:
                return None
            files = repo.commits[sha]
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                },
            )
        if rest[0] == "refs":
            return self._json(
                200,
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                        for n, s in repo.branches.items()
                        if not n.startswith("refs/pr/")
                    ],
                    "converts": [],
                    "tags": [],
                    "pullRequests": [
                        {"name": n, "ref": n, "targetCommit": s}
                        for n, s in repo.branches.items()
                        if n.startswith("refs/pr/")
                    ],
                },
            )
        if rest[0] == "tree":
            sha = self._resolve(repo, rest[1])
            if sha is None:
                return None
            prefix = "/".join(rest[2:])
            return self._json(200, self._tree(repo.commits[sha], prefix))
        if rest[0] == "branch" and method == "POST":
            name = "/".join(rest[1:])
            if name in repo.branches:
                return self._error(409, f"Reference {name} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            sha = self._resolve(repo, start)
            if sha is None:
                return None
            repo.branches[name] = sha
            return self._json(200, {})
        if rest[0] == "preupload":
            sha = repo.branches.get(rest[1])
            files = repo.commits.get(sha, {}) if sha else {}
            out = []
            for f in json.loads(body)["files"]:
                mode = "regular"
                if not self.state.regular_only and (f["path"].endswith(".safetensors") or f["size"] > 100_000):
                    mode = "lfs"
                entry: dict[str, Any] = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
                existing = files.get(f["path"])
                if existing is not None:
                    entry["oid"] = existing.sha256 if mode == "lfs" else git_blob_sha1(existing.data)
                out.append(entry)
            return self._json(200, {"files": out, "commitOid": sha})
        if rest[0] == "commit" and method == "POST":
            return self._commit(repo, rest[1], "create_pr" in query, body)
        return self._error(404, f"no api route {rest}")

    def _tree(self, files: dict[str, Blob], prefix: str) -> list[dict[str, Any]]:
        entries = []
        for path in sorted(files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            blob = files[path]
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(blob.data)}
            if blob.lfs:
                pointer = blob.pointer()
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(blob.data)
            entries.append(entry)
        return entries

    def _commit(self, repo: Repo, rev: str, create_pr: bool, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        parent_rev = rev
        base_sha = repo.branches.get(parent_rev)
        if base_sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        parent = header.get("parentCommit")
        if parent and parent != base_sha and not create_pr:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent or base_sha] if create_pr else repo.commits[base_sha])
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                data = repo.lfs.get(value["oid"])
                if data is None:
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, True)
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] == "deletedFolder":
                for p in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[p]
        sha = secrets.token_hex(20)
        repo.commits[sha] = files
        pr_url = None
        if create_pr:
            repo.pulls += 1
            repo.branches[f"refs/pr/{repo.pulls}"] = sha
            pr_url = f"{self.server.endpoint}/{repo.repo_id}/discussions/{repo.pulls}"
        else:
            repo.branches[rev] = sha
        return self._json(
            200,
            {
                "commitOid": sha,
                "commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{sha}",
                "pullRequestUrl": pr_url,
            },
        )

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return None
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in repo.lfs:
                sig = secrets.token_hex(8)
                href = f"{self.server.endpoint}/lfs-upload/{repo_id}/{obj['oid']}?sig={sig}"
                entry["actions"] = {
                    "upload": {"href": href, "header": {}},
                    "verify": {"href": f"{self.server.endpoint}/lfs-verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, repo_id: str, oid: str, body: bytes) -> None:
        if oid in self.state.drop_lfs_oids:  # the connection drops mid-upload: no answer at all
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if oid in self.state.fail_lfs_oids:  # Retry-After keeps the client's own retries short
            self.send_response(500)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match its oid")
        self.state.repos[repo_id].lfs[oid] = body
        self.state.lfs_puts.append(oid)
        return self._send(200)

    def _download(self, method: str, repo_id: str, rev: str, path: str) -> None:
        head = method == "HEAD"
        repo = self._repo(repo_id, write=False, head=head)
        if repo is None:
            return None
        sha = self._resolve(repo, rev, head=head)
        if sha is None:
            return None
        blob = repo.commits[sha].get(path)
        if blob is None:
            return self._error(404, f"{path} does not exist at {rev}", "EntryNotFound", head=head)
        data = blob.data
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(data))
        status = 200
        ranges = self.headers.get("Range")
        if ranges and ranges.startswith("bytes=") and not head:
            start_s, _, end_s = ranges.removeprefix("bytes=").partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        if head:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return None
        return self._send(status, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Start with :meth:`start`; ``endpoint`` is the base URL; ``state`` holds repositories and switches."""

    def __init__(self) -> None:
        self.state = HubState()
        self._server = _Server(self.state)
        self.endpoint = self._server.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        sha = repo.branches[rev]
        return {p: b.data for p, b in repo.commits[sha].items()}


def quote_rev(rev: str) -> str:
    return quote(rev, safe="")
