"""A small in-memory Hugging Face Hub for tests: the routes huggingface_hub 2.x uses to create a repo and a branch,
upload a folder (every file as a regular git blob, so no LFS or Xet server is needed), and download it again
(`from_pretrained`, `snapshot_download`, `load_lora_weights`).

    with FakeHub({"token-alice": "alice"}) as hub:   # token -> user name
        env["HF_ENDPOINT"] = hub.url                   # huggingface_hub reads it at import: set it in a subprocess

Writes need `Authorization: Bearer <token>` of the namespace's owner (401 without a token or with an unknown one,
403 with another user's token); reads of a private repo need the owner's token. Requests the server does not
understand answer 404 and are listed in `hub.unknown` (and printed to stderr), so a missing route is obvious.
"""

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# A few Hub license identifiers: the Hub refuses a README whose `license` it does not know.
KNOWN_LICENSES = {"apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "cc-by-4.0",
                  "cc-by-nc-4.0", "bsd-3-clause", "other"}
_REPO_ID = re.compile(r"([\w.-]+/)?[\w.-]+")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id

    def resolve(self, revision: str) -> str | None:
        """The commit id of a branch name or of a (full) commit id; None when unknown."""
        return self.branches.get(revision) or (revision if revision in self.commits else None)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The files at a branch or commit (for tests to inspect)."""
        return self.commits[self.resolve(revision)].files


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code huggingface_hub maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class FakeHub:
    """The server (a thread on 127.0.0.1, a free port) and its state: `repos` by id, the `requests` seen
    (method and path, never headers) and the `unknown` ones."""

    def __init__(self, tokens: dict[str, str], read_only: tuple[str, ...] = ()):
        self.tokens, self.read_only = dict(tokens), set(read_only)  # token -> user; tokens that may only read
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        self._commits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- auth ------------------------------------------------------------------------------------------------

    def user(self, authorization: str | None, required: bool) -> str | None:
        """The user a request's `Authorization` header names; 401 for an unknown token, or for none when required."""
        if not authorization:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def readable(self, repo_id: str, user: str | None) -> Repo:
        """A repo the user may read; a private one looks missing to anybody but its owner (as on the Hub)."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, f"Repository Not Found for {repo_id}", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str) -> Repo:
        repo = self.readable(repo_id, user)
        if repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- writes ----------------------------------------------------------------------------------------------

    def create_repo(self, user: str, payload: dict) -> tuple[int, dict]:
        if payload.get("type", "model") != "model":
            raise HubError(400, f"fake hub: only model repos, got type {payload.get('type')!r}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self.repos[repo_id] = Repo(owner=user, private=private)
        first = self._commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "initial commit")
        repo.branches["main"] = first
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo: Repo, branch: str, payload: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise HubError(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
        repo.branches[branch] = start
        return {}

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> str:
        """Apply an NDJSON commit (header, then file / deletedFile / deletedFolder lines) to a branch; its id."""
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.branches[revision]
        files = dict(repo.commits[head].files)
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(422, f"fake hub: commit line {key!r} not supported (no LFS here)")
        commit_id = self._commit(repo, head, files, header.get("summary", ""))
        repo.branches[revision] = commit_id
        return commit_id

    def _commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> str:
        self._commits += 1
        commit_id = hashlib.sha1(f"{self._commits}:{parent}:{message}".encode()).hexdigest()
        repo.commits[commit_id] = Commit(files, message, parent)
        return commit_id

    # ---- reads -----------------------------------------------------------------------------------------------

    def model_info(self, repo_id: str, repo: Repo, revision: str) -> dict:
        commit_id = self._resolve(repo, revision)
        files = repo.commits[commit_id].files
        return {"id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": commit_id, "private": repo.private,
                "disabled": False, "gated": False, "tags": [], "lastModified": "2025-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path, "size": len(content)} for path, content in sorted(files.items())]}

    def tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> list[dict]:
        files = repo.commits[self._resolve(repo, revision)].files
        prefix = path.strip("/") + "/" if path else ""
        entries, folders = [], set()
        for name, content in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": name, "size": len(content), "oid": git_blob_sha1(content)})
        if path and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        return entries

    def resolve_file(self, repo: Repo, revision: str, path: str) -> tuple[str, bytes]:
        commit_id = self._resolve(repo, revision)
        content = repo.commits[commit_id].files.get(path)
        if content is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit_id)
        return commit_id, content

    def _resolve(self, repo: Repo, revision: str) -> str:
        commit_id = repo.resolve(revision)
        if commit_id is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit_id


def validate_readme(content: str) -> list[str]:
    """What the Hub's /api/validate-yaml would object to in a README's front matter (a subset of its checks)."""
    match = re.match(r"---\n(.*?)\n---\n", content, re.S)
    if match is None:
        return []
    meta = yaml.safe_load(match.group(1))
    if not isinstance(meta, dict):
        return ["the front matter is not a YAML mapping"]
    errors = []
    if "license" in meta and meta["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be one of the Hub licenses, got {meta["license"]!r}')
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:
        if not _REPO_ID.fullmatch(str(base)):
            errors.append(f'"base_model" must be a Hub model id, got {base!r}')
    if not isinstance(meta.get("tags", []), list):
        errors.append('"tags" must be a list')
    return errors


_MODEL_ROUTE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>revision|tree|preupload|commit|branch|refs)"
                          r"(?:/(?P<rev>[^/]+)(?P<path>/.*)?)?)?")
_RESOLVE_ROUTE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

        def do_GET(self):
            self._serve()

        def do_HEAD(self):
            self._serve()

        def do_POST(self):
            self._serve()

        def log_message(self, format, *args):  # quiet: `hub.requests` keeps the method and path
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = self._body()
            with hub.lock:
                hub.requests.append(f"{self.command} {url.path}")
                try:
                    status, payload, headers = self._route(url.path, parse_qs(url.query), body)
                except HubError as e:
                    status, payload = e.status, {"error": e.message}
                    headers = {"X-Error-Message": e.message}
                    headers.update({"X-Error-Code": e.code} if e.code else {})
                    headers.update({"X-Repo-Commit": e.commit} if e.commit else {})
            if isinstance(payload, (dict, list)):
                payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
            self.send_response(status)
            for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _route(self, path: str, query: dict, body: bytes) -> tuple[int, dict | list | bytes, dict]:
            auth, method = self.headers.get("Authorization"), self.command
            if method == "GET" and path == "/api/whoami-v2":
                user = hub.user(auth, required=True)
                role = "read" if auth.removeprefix("Bearer ").strip() in hub.read_only else "write"
                return 200, {"type": "user", "name": user,
                             "auth": {"type": "access_token", "accessToken": {"role": role}}}, {}
            if method == "POST" and path == "/api/validate-yaml":
                errors = validate_readme(json.loads(body)["content"])
                return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}, {}
            if method == "POST" and path == "/api/repos/create":
                status, payload = hub.create_repo(hub.user(auth, required=True), json.loads(body))
                return status, payload, {}
            if (match := _MODEL_ROUTE.fullmatch(path)) is not None:
                return self._model_route(match, query, body, auth)
            if (match := _RESOLVE_ROUTE.fullmatch(path)) is not None and method in ("GET", "HEAD") \
                    and "Range" not in self.headers:
                repo = hub.readable(unquote(match["repo"]), hub.user(auth, required=False))
                commit_id, content = hub.resolve_file(repo, unquote(match["rev"]), unquote(match["path"]))
                return 200, content, {"X-Repo-Commit": commit_id, "ETag": f'"{git_blob_sha1(content)}"',
                                      "Content-Type": "application/octet-stream"}
            return self._unknown()

        def _model_route(self, match: re.Match, query: dict, body: bytes, auth: str | None):
            repo_id, action, method = match["repo"], match["action"], self.command
            revision, path = unquote(match["rev"] or "main"), unquote((match["path"] or "").lstrip("/"))
            if method == "GET" and action in (None, "revision", "tree", "refs"):
                repo = hub.readable(repo_id, hub.user(auth, required=False))
                if action == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return 200, hub.tree(repo, revision, path, recursive), {}
                if action == "refs":
                    return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                              for b, c in repo.branches.items()], "converts": [], "tags": []}, {}
                return 200, hub.model_info(repo_id, repo, revision), {}
            if method == "POST" and action in ("preupload", "commit", "branch") and not path:
                repo = hub.writable(repo_id, hub.user(auth, required=True))
                if action == "branch":
                    return 200, hub.create_branch(repo, revision, json.loads(body or b"{}")), {}
                if action == "preupload":
                    hub._resolve(repo, revision)
                    return 200, {"files": [self._upload_mode(repo, revision, f)
                                           for f in json.loads(body)["files"]]}, {}
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                commit_id = hub.commit(repo, revision, lines)
                return 200, {"success": True, "commitOid": commit_id,
                             "commitUrl": f"{hub.url}/{repo_id}/commit/{commit_id}"}, {}
            return self._unknown()

        @staticmethod
        def _upload_mode(repo: Repo, revision: str, file: dict) -> dict:
            current = repo.commits[repo.resolve(revision)].files.get(file["path"])
            return {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False,
                    "oid": git_blob_sha1(current) if current is not None else None}

        def _unknown(self):
            line = f"{self.command} {self.path}"
            hub.unknown.append(line)
            print(f"fake hub: no route for {line}", file=sys.stderr)
            return 404, {"error": f"fake hub: no route for {line}"}, {}

    return Handler
