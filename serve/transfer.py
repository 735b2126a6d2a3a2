"""Artifacts that travel to the nodes of a Ray cluster (``nezha serve --engine ray``).

The process that deploys (``nezha serve``) names an artifact folder on its own node. ``describe`` reads
its manifest there; the bytes of that manifest are the contract every node checks against (they carry the
sha256 of every file). A node then gets a verified folder with ``local_artifact``:

  in place   the deploy path exists on the node and holds the same manifest, and every file verifies:
             nothing is copied (a shared file system, or the artifact copied there beforehand);
  cached     the node fetched it before (a restarted replica, a roll-back): ``$NEZHA_ARTIFACT_CACHE/<key>``,
             where ``key`` is the sha256 of the manifest, verified again before use;
  fetched    else the files come from the deploying node through Ray's object store, ``CHUNK_BYTES`` at a
             time with at most ``WINDOW`` chunks of one file in flight (never a whole file in memory),
             hashed as they arrive, written to a temporary folder that is renamed to its key only when every
             sha256 matched: a corrupted transfer is refused and leaves nothing behind.

``stage`` runs ``local_artifact`` on every node that could host a replica and reports every node that
failed, so that a deploy or reload stops before any replica is replaced. Env (per node):
``NEZHA_ARTIFACT_CACHE`` (default ``~/.cache/nezha/artifacts``) and ``NEZHA_ARTIFACT_FETCH=always`` (never
read the deploy path on this node: a node whose copy is not to be trusted; the tests use it to make a node
of a one-machine cluster behave as a remote one)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from nezha.runtime.artifact import MANIFEST, Artifact
from nezha.runtime.errors import ArtifactError, NezhaError

log = logging.getLogger("nezha.serve")

CHUNK_BYTES = 8 << 20          # one object in Ray's object store per read (at most: a ref may ask for less)
WINDOW = 4                     # chunks of a file in flight: at most 32 MiB of it in memory on either side
CHUNK_TIMEOUT_S = 120.0        # a chunk that does not come (the deploying node is gone) fails the fetch
KEEP = 3                       # artifacts a node's cache keeps (the newest used); older ones are removed
HOSTED = 4                     # artifacts the deploying node serves at once (current, previous, reloads)
CACHE_ENV, FETCH_ENV = "NEZHA_ARTIFACT_CACHE", "NEZHA_ARTIFACT_FETCH"


@dataclass(frozen=True)
class ArtifactRef:
    """What a replica needs to get an artifact: where it lies on the deploying node and what it must hash to."""

    path: str                      # absolute folder on the deploying node
    manifest: bytes                # manifest.json as read there: the expected sha256 of every file
    files: dict                    # file (relative path) -> sha256, from that manifest
    sizes: dict                    # file -> bytes
    host: str                      # name of the actor on the deploying node that serves the files' bytes
    namespace: str
    chunk: int = CHUNK_BYTES       # bytes per read (one object in the object store)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()


def describe(path: str | Path, host: str, namespace: str, chunk: int = CHUNK_BYTES) -> ArtifactRef:
    """Read an artifact's manifest (strictly parsed, every path inside the folder) and file sizes. No file is
    hashed here: each node verifies what it loads."""
    artifact = Artifact.open(path, verify=False)
    manifest = (artifact.root / MANIFEST).read_bytes()
    if Artifact.open(path, verify=False).manifest != artifact.manifest:
        raise ArtifactError(f"{path}/{MANIFEST} changed while it was read; try again")
    sizes = {name: artifact.path(name).stat().st_size for name in artifact.manifest.files}
    return ArtifactRef(str(artifact.root), manifest, dict(artifact.manifest.files), sizes, host, namespace, chunk)


class HostedFiles:
    """The deploying node's side: serves byte ranges of the files of the last ``HOSTED`` artifacts
    described, and only those (a manifest path, resolved inside its folder). Thread-safe."""

    def __init__(self):
        self._artifacts: OrderedDict[str, Artifact] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, ref: ArtifactRef) -> None:
        artifact = Artifact.open(ref.path, verify=False)
        with self._lock:
            self._artifacts[ref.key] = artifact
            self._artifacts.move_to_end(ref.key)
            while len(self._artifacts) > HOSTED:
                self._artifacts.popitem(last=False)

    def read(self, key: str, name: str, offset: int, size: int) -> bytes:
        with self._lock:
            artifact = self._artifacts.get(key)
        if artifact is None or name not in artifact.manifest.files:
            raise ArtifactError(f"{name}: not a file of an artifact this node serves (artifact {key[:12]})")
        with open(artifact.path(name), "rb") as f:
            f.seek(offset)
            return f.read(min(size, CHUNK_BYTES))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nezha" / "artifacts")


def local_artifact(ref: ArtifactRef) -> tuple[Path, str, int]:
    """A verified folder holding ``ref`` on this node -> (folder, "in place" | "cached" | "fetched", bytes
    copied). Raises ArtifactError if no such folder can be had."""
    if os.environ.get(FETCH_ENV) != "always" and _same_manifest(Path(ref.path), ref.manifest):
        try:
            Artifact.open(ref.path, verify=True)
            return Path(ref.path), "in place", 0
        except ArtifactError as e:
            log.warning("artifact at %s differs from the deployed one (%s); fetching it", ref.path, e)
    cache = cache_root()
    final = cache / ref.key
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f".{ref.key}.lock"):            # one fetch per artifact and node; others wait
            if final.is_dir():
                try:
                    Artifact.open(final, verify=True)
                    os.utime(final)                           # recently used: kept by _evict
                    return final, "cached", 0
                except ArtifactError as e:
                    log.warning("cached artifact %s is corrupt (%s); fetching it again", final, e)
                    shutil.rmtree(final)
            for stale in cache.glob(f".{ref.key}.part-*"):    # left by a process killed mid-fetch
                shutil.rmtree(stale, ignore_errors=True)
            part = Path(tempfile.mkdtemp(prefix=f".{ref.key}.part-", dir=cache))
            try:
                copied = fetch(ref, part)
                os.rename(part, final)
            except BaseException:
                shutil.rmtree(part, ignore_errors=True)
                raise
    except OSError as e:
        raise ArtifactError(f"artifact cache {cache} on this node: {e.strerror or e} ({CACHE_ENV} names it)") from None
    log.info("fetched artifact %s (%d bytes) from %s into %s", ref.key[:12], copied, ref.path, final)
    _evict(cache, keep=KEEP)
    return final, "fetched", copied


def fetch(ref: ArtifactRef, dest: Path) -> int:
    """Copy every file of ``ref`` from the deploying node into the empty folder ``dest``, each checked
    against its sha256 as it arrives -> bytes copied. ArtifactError names the first file that differs."""
    host = ray.get_actor(ref.host, namespace=ref.namespace)
    copied = 0
    for name, digest in ref.files.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        offsets = iter(range(0, ref.sizes[name], ref.chunk))
        inflight = deque(host.read.remote(ref.key, name, o, ref.chunk) for _, o in zip(range(WINDOW), offsets))
        h = hashlib.sha256()
        with open(target, "wb") as f:
            while inflight:
                try:
                    data = ray.get(inflight.popleft(), timeout=CHUNK_TIMEOUT_S)
                except RayError as e:
                    raise ArtifactError(f"{name}: fetching from the deploying node failed: {_cause(e)}") from None
                nxt = next(offsets, None)
                if nxt is not None:
                    inflight.append(host.read.remote(ref.key, name, nxt, ref.chunk))
                h.update(data)
                f.write(data)
                copied += len(data)
        if h.hexdigest() != digest:
            raise ArtifactError(f"{name}: sha256 mismatch after the transfer from {ref.path} (the file there "
                                f"changed, or the copy was corrupted); the node refuses the artifact")
    (dest / MANIFEST).write_bytes(ref.manifest)
    return copied


@ray.remote(num_cpus=0, max_retries=0)
def _stage(ref: ArtifactRef) -> tuple[str, str, int]:
    _, how, copied = local_artifact(ref)
    return ray.get_runtime_context().get_node_id(), how, copied


def stage(ref: ArtifactRef, min_cpus: float) -> list[tuple[str, str, int]]:
    """Bring ``ref`` to every live node with at least ``min_cpus`` CPUs (those that can host a replica), in
    parallel -> per node (node id, how, bytes copied). One ArtifactError lists every node that failed."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= min_cpus]
    tasks = [(n, _stage.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
              .remote(ref)) for n in nodes]
    done, problems = [], []
    for node, task in tasks:
        try:
            done.append(ray.get(task))
        except RayError as e:
            problems.append(f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']}): {_cause(e)}")
    if problems:
        raise ArtifactError(f"artifact {ref.path} did not reach every node: " + "; ".join(problems))
    return done


def _same_manifest(folder: Path, manifest: bytes) -> bool:
    try:
        return (folder / MANIFEST).read_bytes() == manifest
    except OSError:
        return False


def _cause(e: RayError) -> str:
    """The user-facing message inside a Ray error (a task's own exception, else Ray's first line)."""
    cause = e.cause if isinstance(e, RayTaskError) else None
    return str(cause) if isinstance(cause, NezhaError) else str(e).strip().splitlines()[0]


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _evict(cache: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used artifacts (a replica that loaded one has it in memory)."""
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and len(p.name) == 64 and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
