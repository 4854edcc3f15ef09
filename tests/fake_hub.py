"""A small in-memory Hugging Face Hub for tests: the routes huggingface_hub 2.x uses to check a token (whoami), create
a repo and a branch, upload a folder, and download it again (`from_pretrained`, `snapshot_download`,
`load_lora_weights`).

    with FakeHub({"token-alice": "alice", "token-read": Token("alice", "read")}) as hub:   # token -> user or Token
        env["HF_ENDPOINT"] = hub.url          # huggingface_hub reads it at import: set it in a subprocess
        env["HF_HUB_DISABLE_XET"] = "1"       # large files through LFS, which this server speaks (Xet it does not)

Uploads take the two paths the Hub offers. Small files go as regular git blobs, base64 in the commit. A file of
`lfs_threshold` bytes or more, or one whose name matches a `filter=lfs` pattern of the branch's .gitattributes (a new
repo's lists *.safetensors), gets "lfs" from preupload: its bytes go to the LFS batch API and an upload URL, the
commit names them by sha256. With hf_xet installed, `HfApi.upload_folder` hands such files to
`_upload_pipeline.pipelined_upload` and the Hub's Xet storage instead (a token from
`/api/models/<repo>/xet-write-token/<revision>`, then Xet's own protocol), which cannot be faked here.
HF_HUB_DISABLE_XET=1 turns `utils._runtime.is_xet_available()` off: upload_folder then goes through `create_commit`,
whose `_commit_api._upload_files` uses the LFS batch API.

Writes need `Authorization: Bearer <token>` of the namespace's owner, with write access (401 without a token or with
an unknown one, 403 with another user's token, a read token, or a fine-grained one without `repo.write` on the
namespace or the repo); reads of a private repo need the owner's token. /api/whoami-v2 answers in the Hub's shape
(`auth.accessToken.role`, and `auth.accessToken.fineGrained.scoped` for fine-grained tokens). Requests the server
does not understand answer 404 and are listed in `hub.unknown` (and printed to stderr), so a missing route is
obvious.
"""

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# A few Hub license identifiers: the Hub refuses a README whose `license` it does not know.
KNOWN_LICENSES = {"apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "cc-by-4.0",
                  "cc-by-nc-4.0", "bsd-3-clause", "other"}
_REPO_ID = re.compile(r"([\w.-]+/)?[\w.-]+")
# Files from this size up go through LFS: the Hub keeps regular git blobs small (huggingface_hub assumes them 5 MB at
# most: `_commit_api.CommitOperationAdd._local_oid`).
LFS_THRESHOLD = 5 * 1024 * 1024


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Token:
    """An access token as /api/whoami-v2 describes it: `role` "read", "write" or "fineGrained"; a fine-grained one
    holds permissions per entity in `scoped` (a user or organization name, or a repo id: ["repo.content.read",
    "repo.write", ...])."""
    user: str
    role: str = "write"
    scoped: dict[str, list[str]] = field(default_factory=dict)

    def may_write(self, repo_id: str) -> bool:
        if self.role == "fineGrained":
            return "repo.write" in self.scoped.get(repo_id.split("/")[0], []) + self.scoped.get(repo_id, [])
        return self.role == "write"

    def whoami(self) -> dict:
        """/api/whoami-v2's answer for this token, in the Hub's shape (the fields a client reads, and a few more)."""
        access = {"displayName": f"{self.user}-{self.role}", "role": self.role,
                  "createdAt": "2025-01-01T00:00:00.000Z"}
        if self.role == "fineGrained":
            access["fineGrained"] = {
                "canReadGatedRepos": False, "global": ["discussion.write", "post.write"],
                "scoped": [{"entity": {"_id": hashlib.sha1(name.encode()).hexdigest()[:24],
                                       "type": "model" if "/" in name else "user" if name == self.user else "org",
                                       "name": name}, "permissions": permissions}
                           for name, permissions in self.scoped.items()]}
        return {"type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
                "fullname": self.user.capitalize(), "isPro": False, "canPay": False, "periodEnd": None,
                "avatarUrl": "/avatars/default.svg", "orgs": [],
                "auth": {"type": "access_token", "accessToken": access}}


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
    """The server (a thread on 127.0.0.1, a free port) and its state: `repos` by id, the LFS objects stored by
    sha256 (`lfs`), the `requests` seen (method and path, never headers) and the `unknown` ones. `tokens` maps a
    token to its user (a write token) or to a Token."""

    def __init__(self, tokens: dict[str, str | Token], lfs_threshold: int = LFS_THRESHOLD):
        self.tokens = {token: user if isinstance(user, Token) else Token(user) for token, user in tokens.items()}
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self._lfs_announced: set[str] = set()  # the sha256 of objects a batch request gave an upload URL
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

    def token(self, authorization: str | None, required: bool) -> Token | None:
        """The token a request's `Authorization` header holds; 401 for an unknown one, or for none when required."""
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

    def writable(self, repo_id: str, token: Token) -> Repo:
        repo = self.readable(repo_id, token.user)
        if repo.owner != token.user or not token.may_write(repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """A repository with `files` on main, made directly (e.g. a base model for the code under test to read)."""
        repo = self.repos[repo_id] = Repo(owner=repo_id.split("/")[0], private=private)
        repo.branches["main"] = self._commit(repo, None, files, "initial commit")
        return repo

    # ---- writes ----------------------------------------------------------------------------------------------

    def create_repo(self, token: Token, payload: dict) -> tuple[int, dict]:
        if payload.get("type", "model") != "model":
            raise HubError(400, f"fake hub: only model repos, got type {payload.get('type')!r}")
        namespace = payload.get("organization") or token.user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != token.user or not token.may_write(namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self.repos[repo_id] = Repo(owner=token.user, private=private)
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
        """Apply an NDJSON commit (header, then file / lfsFile / deletedFile / deletedFolder lines) to a branch; its
        id. An lfsFile line names, by sha256, an object uploaded through LFS."""
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
            elif key == "lfsFile":
                if value.get("oid") not in self.lfs:
                    raise HubError(422, f"LFS object {value.get('oid')} of {value['path']} was never uploaded")
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(422, f"fake hub: commit line {key!r} not supported")
        commit_id = self._commit(repo, head, files, header.get("summary", ""))
        repo.branches[revision] = commit_id
        return commit_id

    def upload_mode(self, repo: Repo, revision: str, file: dict) -> dict:
        """preupload's answer for one file: "lfs" from `lfs_threshold` bytes up or for a name matching a `filter=lfs`
        pattern of the branch's .gitattributes, else "regular"; `oid` is the current content's (sha256 for LFS, the
        git blob id otherwise), so that huggingface_hub skips an unchanged file."""
        files = repo.files(revision)
        patterns = [line.split()[0] for line in files.get(".gitattributes", b"").decode().splitlines()
                    if "filter=lfs" in line]
        lfs = file["size"] >= self.lfs_threshold or any(fnmatch(PurePosixPath(file["path"]).name, pattern)
                                                        for pattern in patterns)
        current = files.get(file["path"])
        oid = None if current is None else hashlib.sha256(current).hexdigest() if lfs else git_blob_sha1(current)
        return {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}

    def lfs_batch(self, payload: dict) -> dict:
        """The LFS batch API, operation "upload", basic transfer: an upload URL for each object not stored yet."""
        if payload.get("operation") != "upload":
            raise HubError(400, f"fake hub: LFS batch operation {payload.get('operation')!r} not supported")
        objects = []
        for obj in payload["objects"]:
            objects.append({"oid": obj["oid"], "size": obj["size"]})
            if obj["oid"] not in self.lfs:
                self._lfs_announced.add(obj["oid"])
                objects[-1]["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, oid: str, content: bytes) -> None:
        """The PUT of an object's bytes to its upload URL (presigned storage on the Hub: no token)."""
        if oid not in self._lfs_announced or hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"LFS upload of {oid}: not announced by a batch request, or other bytes")
        self.lfs[oid] = content

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
_ORGANIZATION_ROUTE = re.compile(r"/api/organizations/[^/]+/overview")
_LFS_BATCH_ROUTE = re.compile(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch")
_LFS_UPLOAD_ROUTE = re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

        def do_GET(self):
            self._serve()

        def do_HEAD(self):
            self._serve()

        def do_POST(self):
            self._serve()

        def do_PUT(self):
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
                return 200, hub.token(auth, required=True).whoami(), {}
            if method == "GET" and _ORGANIZATION_ROUTE.fullmatch(path):
                # bitsandbytes >= 0.50 asks, when imported on an AVX512-BF16 CPU (diffusers imports it wherever it
                # is installed), whether the publisher of its CPU kernel is trusted (`kernels`): no organisation
                # here, so it keeps its own CPU code, as it does when the real Hub's answer does not verify it.
                return 404, {"error": "Organization not found"}, {}
            if method == "POST" and path == "/api/validate-yaml":
                errors = validate_readme(json.loads(body)["content"])
                return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}, {}
            if method == "POST" and path == "/api/repos/create":
                status, payload = hub.create_repo(hub.token(auth, required=True), json.loads(body))
                return status, payload, {}
            if method == "POST" and (match := _LFS_BATCH_ROUTE.fullmatch(path)) is not None:
                hub.writable(unquote(match["repo"]), hub.token(auth, required=True))
                return 200, hub.lfs_batch(json.loads(body)), {"Content-Type": "application/vnd.git-lfs+json"}
            if method == "PUT" and (match := _LFS_UPLOAD_ROUTE.fullmatch(path)) is not None:
                hub.lfs_upload(match["oid"], body)
                return 200, b"", {}
            if (match := _MODEL_ROUTE.fullmatch(path)) is not None:
                return self._model_route(match, query, body, auth)
            if (match := _RESOLVE_ROUTE.fullmatch(path)) is not None and method in ("GET", "HEAD") \
                    and "Range" not in self.headers:
                token = hub.token(auth, required=False)
                repo = hub.readable(unquote(match["repo"]), token and token.user)
                commit_id, content = hub.resolve_file(repo, unquote(match["rev"]), unquote(match["path"]))
                return 200, content, {"X-Repo-Commit": commit_id, "ETag": f'"{git_blob_sha1(content)}"',
                                      "Content-Type": "application/octet-stream"}
            return self._unknown()

        def _model_route(self, match: re.Match, query: dict, body: bytes, auth: str | None):
            repo_id, action, method = match["repo"], match["action"], self.command
            revision, path = unquote(match["rev"] or "main"), unquote((match["path"] or "").lstrip("/"))
            if method == "GET" and action in (None, "revision", "tree", "refs"):
                token = hub.token(auth, required=False)
                repo = hub.readable(repo_id, token and token.user)
                if action == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return 200, hub.tree(repo, revision, path, recursive), {}
                if action == "refs":
                    return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                              for b, c in repo.branches.items()], "converts": [], "tags": []}, {}
                return 200, hub.model_info(repo_id, repo, revision), {}
            if method == "POST" and action in ("preupload", "commit", "branch") and not path:
                repo = hub.writable(repo_id, hub.token(auth, required=True))
                if action == "branch":
                    return 200, hub.create_branch(repo, revision, json.loads(body or b"{}")), {}
                if action == "preupload":
                    hub._resolve(repo, revision)
                    return 200, {"files": [hub.upload_mode(repo, revision, f) for f in json.loads(body)["files"]]}, {}
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                commit_id = hub.commit(repo, revision, lines)
                return 200, {"success": True, "commitOid": commit_id,
                             "commitUrl": f"{hub.url}/{repo_id}/commit/{commit_id}"}, {}
            return self._unknown()

        def _unknown(self):
            line = f"{self.command} {self.path}"
            hub.unknown.append(line)
            print(f"fake hub: no route for {line}", file=sys.stderr)
            return 404, {"error": f"fake hub: no route for {line}"}, {}

    return Handler
