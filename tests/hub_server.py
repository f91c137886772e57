"""A local fake of the Hugging Face Hub HTTP endpoints that huggingface_hub 2.4, timm and transformers use.

Written by hand because no installed library serves the Hub protocol; it implements only what the tests need:
repo creation, branch creation, README metadata validation, pre-upload (every file answered "regular", so the
client sends base64 content inside the NDJSON commit, which it does when hf_xet is disabled), commit, model info,
file tree listing (one page) and file resolve (HEAD/GET with the ETag / X-Repo-Commit headers the download client
requires).
Repositories live in memory; every request is logged with its Authorization header so tests can check the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class Revision:
    commit: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    branches: dict[str, Revision] = field(default_factory=lambda: {"main": Revision("0" * 40, {})})


@dataclass
class LoggedRequest:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """The Hub's state plus a threaded HTTP server on 127.0.0.1 (a free port); use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self.fail_commits = False  # answer every commit with HTTP 500
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision].files)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # --- plumbing -------------------------------------------------------------------------------------
        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(LoggedRequest(method, path, self.headers.get("Authorization")))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            for route_method, pattern, action in _ROUTES:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    with hub._lock:
                        return action(self, body=body, **match.groupdict())
            self._json(404, {"error": f"fake hub: no route for {method} {path}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def _json(self, status: int, payload: dict | list, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _revision(self, repo: str, rev: str) -> Revision | None:
            if repo not in hub.repos:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            branches = hub.repos[repo].branches
            found = branches.get(rev) or next((b for b in branches.values() if b.commit == rev), None)
            if found is None:
                self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return found

        def _authorized(self) -> bool:
            if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        # --- endpoints ------------------------------------------------------------------------------------
        def create_repo(self, body: bytes) -> None:
            if not self._authorized():
                return
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._json(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

        def create_branch(self, body: bytes, repo: str, rev: str) -> None:
            if not self._authorized() or (main := self._revision(repo, "main")) is None:
                return
            hub.repos[repo].branches.setdefault(rev, Revision(main.commit, dict(main.files)))
            self._json(200, {})

        def validate_yaml(self, body: bytes) -> None:
            self._json(200, {"errors": [], "warnings": []})

        def preupload(self, body: bytes, repo: str, rev: str) -> None:
            if not self._authorized() or self._revision(repo, rev) is None:
                return
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in json.loads(body)["files"]
            ]
            self._json(200, {"files": files})

        def commit(self, body: bytes, repo: str, rev: str) -> None:
            if not self._authorized() or (parent := self._revision(repo, rev)) is None:
                return
            if hub.fail_commits:
                return self._json(500, {"error": "Internal Error - simulated by the fake hub"})
            files = dict(parent.files)
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return self._json(400, {"error": f"fake hub: unsupported commit operation {item['key']}"})
            commit = hashlib.sha1(parent.commit.encode() + body).hexdigest()
            hub.repos[repo].branches[rev] = Revision(commit, files)
            self._json(200, {"commitUrl": f"{self._url(repo)}/commit/{commit}", "commitOid": commit,
                             "pullRequestUrl": None})

        def model_info(self, body: bytes, repo: str, rev: str = "main") -> None:
            if (revision := self._revision(repo, rev)) is None:
                return
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(revision.files.items())]
            self._json(200, {"id": repo, "modelId": repo, "sha": revision.commit, "private": hub.repos[repo].private,
                             "siblings": siblings, "tags": []})

        def tree(self, body: bytes, repo: str, rev: str, folder: str | None = None) -> None:
            """GET /api/models/REPO/tree/REV[/FOLDER]?recursive=...: files (and, not recursive, folders), one page."""
            if (revision := self._revision(repo, rev)) is None:
                return
            recursive = "recursive=true" in (urlsplit(self.path).query or "").lower()
            prefix = f"{folder.strip('/')}/" if folder else ""
            entries, folders = [], set()
            for name, data in sorted(revision.files.items()):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if not recursive and "/" in rest:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append({"type": "file", "path": name, "size": len(data),
                                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()})
            entries += [{"type": "directory", "path": name, "oid": "0" * 40} for name in sorted(folders)]
            self._json(200, entries)

        def resolve(self, body: bytes, repo: str, rev: str, filename: str) -> None:
            if (revision := self._revision(repo, rev)) is None:
                return
            if filename not in revision.files:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": revision.commit})
            data = revision.files[filename]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", revision.commit)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _url(self, repo_id: str) -> str:
            return f"{hub.endpoint}/{repo_id}"

    _ROUTES = [
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/models/{_REPO}/branch/{_REV}", Handler.create_branch),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", Handler.preupload),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", Handler.commit),
        ("GET", rf"/api/models/{_REPO}", Handler.model_info),
        ("GET", rf"/api/models/{_REPO}/revision/{_REV}", Handler.model_info),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<folder>.+))?", Handler.tree),
        ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<filename>.+)", Handler.resolve),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<filename>.+)", Handler.resolve),
    ]
    return Handler
