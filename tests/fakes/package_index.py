"""A package index on loopback that pip and npm install from: PyPI's simple API and an npm registry.

It serves from a thread of its own, so pip and npm reach it whether they run under a sync fixture or while a
test's event loop is busy. Packages are real: wheels with the RECORD digests pip verifies, wheels repacked from
distributions installed in this interpreter, and npm tarballs whose sha1 and sha512 the packument states.

    index = PackageIndex()  # or the `package_index` fixture
    index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "def double(x):\\n    return 2 * x\\n"})
    index.add_installed("pytest", "pluggy", "iniconfig", "packaging", "pygments")
    index.add_npm("tiny-dep", "1.0.0", {"index.js": "exports.double = (x) => 2 * x;\\n"})
    ...  # pip install --index-url index.simple_url ...; npm ci --registry index.npm_url
    index.requests  # every path asked for, refused ones included, in order
    index.close()

The simple API (PEP 503) answers HTML or, when asked, PEP 691 JSON, with PEP 658 metadata files beside the wheels;
a name that is not normalized redirects to the normalized one and an unknown project is a 404, as on PyPI. Like
npmjs, the registry answers the abbreviated packument to `Accept: application/vnd.npm.install-v1+json` and
`{"error": "Not found"}` for what it does not hold. Publishing a file or version again is refused unless it is
byte for byte the same, as both registries refuse to replace what was published. With `token`, every request
needs it, as HTTP Basic password (pip's `http://user:TOKEN@host/simple/`) or as `Bearer TOKEN` (npm's
`_authToken`); other requests get 401 and a `WWW-Authenticate` challenge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import functools
import gzip
import hashlib
import html
import importlib.metadata
import io
import json
import re
import secrets
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import pytest
from aiohttp import web
from packaging.version import Version

SIMPLE_JSON, SIMPLE_HTML = "application/vnd.pypi.simple.v1+json", "application/vnd.pypi.simple.v1+html"
NPM_ABBREVIATED = "application/vnd.npm.install-v1+json"
# The fields npm's abbreviated packument keeps of each version (npm's registry docs, "abbreviated metadata").
ABBREVIATED_FIELDS = ("name", "version", "deprecated", "dependencies", "optionalDependencies", "devDependencies",
                      "bundleDependencies", "peerDependencies", "peerDependenciesMeta", "bin", "directories",
                      "dist", "engines", "_hasShrinkwrap", "hasInstallScript", "os", "cpu")
PROJECT_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
NPM_NAME = re.compile(r"^(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed, so the same files always make the same bytes and digests
NPM_MTIME = 499162500  # 1985-10-26T08:15:00Z, the mtime `npm pack` gives every entry


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wheel:
    """A file of a project on the simple index, with its core metadata served beside it (PEP 658)."""

    name: str
    version: str
    filename: str
    data: bytes
    metadata: bytes
    requires_python: str | None


@dataclass(frozen=True)
class NpmVersion:
    """One published version: its package.json as the registry lists it, and the tarball."""

    manifest: dict[str, Any]
    tarball: bytes
    published: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zip(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, ZIP_EPOCH)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _stem(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def _build_wheel(name: str, version: str, files: Mapping[str, bytes], metadata: bytes, wheel: bytes) -> Wheel:
    """A wheel of `files` with this METADATA and WHEEL file, and the RECORD of all of them (PEP 427)."""
    tags = email.parser.BytesParser().parsebytes(wheel).get_all("Tag") or []
    if not tags:
        raise ValueError(f"{name} {version}: its WHEEL file names no Tag")
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    filename = f"{_stem(name, version)}-{'-'.join('.'.join(part) for part in parts)}.whl"
    dist_info = f"{_stem(name, version)}.dist-info"
    files = {**files, f"{dist_info}/METADATA": metadata, f"{dist_info}/WHEEL": wheel}
    digest = {path: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
              for path, data in files.items()}
    record = "".join(f"{path},sha256={digest[path]},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    requires_python = email.parser.BytesParser().parsebytes(metadata).get("Requires-Python")
    return Wheel(name, version, filename, _zip(files), metadata, requires_python)


@functools.cache
def _repacked(name: str) -> Wheel:
    dist = importlib.metadata.distribution(name)
    info = next((f for f in dist.files or () if f.name == "WHEEL" and f.parent.name.endswith(".dist-info")), None)
    if info is None:
        raise ValueError(f"{name} was not installed from a wheel (no RECORD naming a .dist-info/WHEEL); "
                         "only such distributions can be repacked")
    wheel = info.locate().read_bytes()
    if email.parser.BytesParser().parsebytes(wheel).get("Root-Is-Purelib", "").lower() != "true":
        raise ValueError(f"{name} is not pure Python: a wheel repacked here would not fit another interpreter")
    # The installed .dist-info may be spelled otherwise (Pygments-…); a wheel holding two would be refused.
    old, new = f"{info.parent}/", f"{_stem(dist.metadata['Name'], dist.version)}.dist-info/"
    # Left out: compiled bytecode, console scripts outside site-packages (pip writes them anew from
    # entry_points.txt), and what the installer added, which RECORD must not list in a wheel.
    skipped = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json", "METADATA", "WHEEL"}
    files = {new + str(f).removeprefix(old) if str(f).startswith(old) else str(f): f.locate().read_bytes()
             for f in dist.files
             if f.parts[0] != ".." and "__pycache__" not in f.parts and f.suffix != ".pyc"
             and not (f.parent == info.parent and f.name in skipped)}
    metadata = (info.locate().parent / "METADATA").read_bytes()
    return _build_wheel(dist.metadata["Name"], dist.version, files, metadata, wheel)


def _npm_tarball(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path, data in files.items():
            entry = tarfile.TarInfo(f"package/{path}")
            entry.size, entry.mode, entry.mtime = len(data), 0o644, NPM_MTIME
            archive.addfile(entry, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _encoded(files: Mapping[str, str | bytes]) -> dict[str, bytes]:
    return {path: data.encode() if isinstance(data, str) else data for path, data in files.items()}


def _negotiate(accept: str, offered: Sequence[str]) -> str | None:
    """The offered media type `accept` ranks highest, the earlier offer winning ties (RFC 9110 12.5.1)."""
    ranges = []
    for part in accept.split(","):
        media, _, params = part.partition(";")
        q = re.search(r"(?:^|;)\s*q\s*=\s*([0-9.]+)", params)
        try:
            ranges.append((media.strip().lower(), float(q[1]) if q else 1.0))
        except ValueError:
            continue

    def quality(offer: str) -> float:
        # The most specific range that matches decides, whatever broader ranges say.
        matches = [(3 if media == offer else 2 if media == offer.split("/")[0] + "/*" else 1, q)
                   for media, q in ranges if media in (offer, offer.split("/")[0] + "/*", "*/*")]
        return max(matches)[1] if matches else 0.0

    best = max(offered, key=quality)
    return best if quality(best) > 0 else None


class PackageIndex:
    """A PyPI-style simple index and an npm registry serving what the test adds, on a free loopback port."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._projects: dict[str, dict[str, Wheel]] = {}  # normalized name -> filename -> wheel
        self._files: dict[str, Wheel] = {}
        self._npm: dict[str, dict[str, NpmVersion]] = {}  # in order of publication, so the last one is latest
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="package-index", daemon=True)
        self._thread.start()
        app = web.Application(middlewares=[self._record_and_authorize])
        app.router.add_get("/simple/", self._simple_root)
        app.router.add_get("/simple/{project}/", self._simple_project)
        app.router.add_get("/simple/{project}", self._add_slash)
        app.router.add_get("/files/{filename}", self._file)
        app.router.add_get("/npm/{spec:.+}", self._npm_get)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.host_port = "127.0.0.1:%d" % self._runner.addresses[0][1]
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    @property
    def simple_url(self) -> str:
        return f"{self.url}/simple/"

    @property
    def npm_url(self) -> str:
        return f"{self.url}/npm/"

    def close(self) -> None:
        """Stop serving; the port is free again when this returns."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> PackageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Publishing

    def add_wheel(self, name: str, version: str, files: Mapping[str, str | bytes], requires: Sequence[str] = (),
                  requires_python: str | None = None) -> str:
        """Publish a pure-Python wheel of `files` (path in site-packages -> content); return its filename."""
        if not PROJECT_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid project name (PEP 508)")
        if str(Version(version)) != version:
            raise ValueError(f"{version!r} is not a normalized version; write {str(Version(version))!r}")
        extras = sorted({m for r in requires for m in re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", r)})
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                 *([f"Requires-Python: {requires_python}"] if requires_python else []),
                 *(f"Requires-Dist: {r}" for r in requires), *(f"Provides-Extra: {e}" for e in extras)]
        wheel = "Wheel-Version: 1.0\nGenerator: tests.fakes.package_index\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        built = _build_wheel(name, version, _encoded(files), ("\n".join(lines) + "\n").encode(), wheel.encode())
        self._publish(built)
        return built.filename

    def add_installed(self, *dist_names: str) -> list[str]:
        """Publish the named distributions installed in this interpreter, repacked as wheels; return filenames.

        Their requirements are not followed: name every distribution an install will need."""
        wheels = [_repacked(name) for name in dist_names]
        for wheel in wheels:
            self._publish(wheel)
        return [wheel.filename for wheel in wheels]

    def add_npm(self, name: str, version: str, files: Mapping[str, str | bytes],
                dependencies: Mapping[str, str] | None = None) -> dict[str, str]:
        """Publish an npm package of `files` (path in the package -> content), its package.json written from the
        arguments; return its `dist` (tarball URL, shasum, integrity) as the packument lists it."""
        if not NPM_NAME.match(name) or len(name) > 214:
            raise ValueError(f"{name!r} is not a valid npm package name")
        if "package.json" in files:
            raise ValueError("package.json is written from name, version and dependencies; leave it out of files")
        manifest: dict[str, Any] = {"name": name, "version": version}
        if "index.js" in files:
            manifest["main"] = "index.js"
        if dependencies:
            manifest["dependencies"] = dict(dependencies)
        contents = {"package.json": json.dumps(manifest, indent=2).encode() + b"\n", **_encoded(files)}
        tarball = _npm_tarball(contents)
        published = NpmVersion({**manifest, "_id": f"{name}@{version}"}, tarball,
                               time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        with self._lock:
            versions = self._npm.setdefault(name, {})
            if version in versions and versions[version].tarball != tarball:
                raise ValueError(f"{name}@{version} is already published with other contents; the npm registry "
                                 "refuses to publish over a published version")
            versions.setdefault(version, published)
        return self._npm_dist(self.url, name, version, versions[version])

    def _publish(self, wheel: Wheel) -> None:
        with self._lock:
            known = self._files.get(wheel.filename)
            if known is not None and known.data != wheel.data:
                raise ValueError(f"{wheel.filename} is already published with other contents; PyPI refuses to "
                                 "replace a file (400 File already exists)")
            self._files[wheel.filename] = wheel
            self._projects.setdefault(normalize(wheel.name), {})[wheel.filename] = wheel

    # Serving

    @web.middleware
    async def _record_and_authorize(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(request.raw_path)
        if self.token is None or self._authorized(request.headers.get("Authorization", "")):
            return await handler(request)
        return web.Response(status=401, text="401 Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="package index"'})

    def _authorized(self, header: str) -> bool:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer":
            return secrets.compare_digest(credential.strip().encode(), self.token.encode())
        if scheme.lower() != "basic":
            return False
        try:
            password = base64.b64decode(credential.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(password.encode(), self.token.encode())

    def _simple_format(self, request: web.Request) -> str:
        # PyPI's order of preference; an Accept header it can satisfy with none of them still gets HTML.
        accept = request.headers.get("Accept", "text/html")
        return _negotiate(accept, ["text/html", SIMPLE_HTML, SIMPLE_JSON]) or "text/html"

    async def _simple_root(self, request: web.Request) -> web.Response:
        form = self._simple_format(request)
        with self._lock:
            names = sorted({next(iter(files.values())).name for files in self._projects.values()}, key=normalize)
        if form == SIMPLE_JSON:
            return _json({"meta": {"api-version": "1.1"}, "projects": [{"name": n} for n in names]}, form)
        links = "".join(f'    <a href="/simple/{normalize(n)}/">{html.escape(n)}</a><br/>\n' for n in names)
        return _html("Simple index", "", links, form)

    async def _add_slash(self, request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(f"/simple/{normalize(request.match_info['project'])}/")

    async def _simple_project(self, request: web.Request) -> web.Response:
        asked = request.match_info["project"]
        with self._lock:
            wheels = list(self._projects.get(normalize(asked), {}).values())
        if not wheels:
            raise web.HTTPNotFound(text="404 Not Found\n")
        if asked != normalize(asked):
            raise web.HTTPMovedPermanently(f"/simple/{normalize(asked)}/")
        form = self._simple_format(request)
        if form == SIMPLE_JSON:
            files = [{"filename": w.filename, "url": f"/files/{quote(w.filename)}",
                      "hashes": {"sha256": _sha256(w.data)}, "size": len(w.data), "yanked": False,
                      # PyPI's two spellings: PEP 714's, and the one it kept for older clients (pip 22.3 to
                      # 23.0 crash on PEP 691's own "dist-info-metadata" object, hence PEP 714).
                      "core-metadata": {"sha256": _sha256(w.metadata)},
                      "data-dist-info-metadata": {"sha256": _sha256(w.metadata)},
                      **({"requires-python": w.requires_python} if w.requires_python else {})} for w in wheels]
            versions = sorted({w.version for w in wheels}, key=Version)
            return _json({"meta": {"api-version": "1.1"}, "name": asked, "versions": versions, "files": files}, form)
        links = ""
        for w in wheels:
            python = f' data-requires-python="{html.escape(w.requires_python)}"' if w.requires_python else ""
            metadata = f"sha256={_sha256(w.metadata)}"
            links += (f'    <a href="/files/{quote(w.filename)}#sha256={_sha256(w.data)}"{python}'
                      f' data-dist-info-metadata="{metadata}" data-core-metadata="{metadata}">{w.filename}</a><br/>\n')
        return _html(f"Links for {asked}", f"    <h1>Links for {asked}</h1>\n", links, form)

    async def _file(self, request: web.Request) -> web.Response:
        filename = request.match_info["filename"]
        with self._lock:
            wheel = self._files.get(filename.removesuffix(".metadata"))
        if wheel is None:
            raise web.HTTPNotFound(text="404 Not Found\n")
        data = wheel.metadata if filename.endswith(".metadata") else wheel.data
        return web.Response(body=data, content_type="application/octet-stream")

    async def _npm_get(self, request: web.Request) -> web.Response:
        # npm escapes a scoped name's slash (@scope%2fname); the raw path keeps it whatever the router decodes.
        spec = unquote(request.raw_path.partition("?")[0].removeprefix("/npm/"))
        name, _, tarball = spec.partition("/-/")
        scope = name.split("/")[0] + "/" if name.startswith("@") else ""
        name, _, version = name.removeprefix(scope).partition("/")
        name = scope + name
        with self._lock:
            versions = dict(self._npm.get(name, {}))
        # Tarball URLs name the host the client asked for, as registries behind a proxy do (Verdaccio's
        # X-Forwarded-Host, Artifactory's base URL): a client reaching this index by another name can follow them.
        base = f"http://{request.host}"
        if tarball:
            basename = name.removeprefix(scope)
            found = next((v for n, v in versions.items() if tarball == f"{basename}-{n}.tgz"), None)
            if found is None:
                return _npm_not_found()
            return web.Response(body=found.tarball, content_type="application/octet-stream")
        if not versions:
            return _npm_not_found()
        latest = list(versions)[-1]
        full = {v: {**p.manifest, "dist": self._npm_dist(base, name, v, p)} for v, p in versions.items()}
        if version:
            chosen = full.get(latest if version == "latest" else version)
            return web.json_response(chosen) if chosen else _npm_not_found()
        modified = max(p.published for p in versions.values())
        if _negotiate(request.headers.get("Accept", "*/*"), ["application/json", NPM_ABBREVIATED]) == NPM_ABBREVIATED:
            abbreviated = {v: {k: m[k] for k in ABBREVIATED_FIELDS if k in m} for v, m in full.items()}
            return _json({"name": name, "modified": modified, "dist-tags": {"latest": latest},
                          "versions": abbreviated}, NPM_ABBREVIATED)
        times = {"created": min(p.published for p in versions.values()), "modified": modified,
                 **{v: p.published for v, p in versions.items()}}
        return web.json_response({"_id": name, "name": name, "dist-tags": {"latest": latest}, "versions": full,
                                  "time": times})

    @staticmethod
    def _npm_dist(base: str, name: str, version: str, published: NpmVersion) -> dict[str, str]:
        sha512 = base64.b64encode(hashlib.sha512(published.tarball).digest()).decode()
        return {"tarball": f"{base}/npm/{name}/-/{name.split('/')[-1]}-{version}.tgz",
                "shasum": hashlib.sha1(published.tarball).hexdigest(), "integrity": f"sha512-{sha512}"}


def _json(body: Any, content_type: str) -> web.Response:
    return web.Response(text=json.dumps(body), content_type=content_type, headers={"Vary": "Accept"})


def _html(title: str, heading: str, links: str, content_type: str) -> web.Response:
    page = (f'<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" content="1.1">\n'
            f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n{heading}{links}  </body>\n</html>\n")
    return web.Response(text=page, content_type=content_type, headers={"Vary": "Accept"})


def _npm_not_found() -> web.Response:
    return web.json_response({"error": "Not found"}, status=404)


@pytest.fixture
def package_index() -> Iterator[PackageIndex]:
    """A started, empty package index, closed when the test ends."""
    with PackageIndex() as index:
        yield index
