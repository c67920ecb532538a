"""Retrieval replicas as Ray actors: several ``openrlhf-search serve`` servers of one index, one per node by default.

A single retrieval server is a bottleneck and a single point of failure of a multi-node run. On a Ray cluster (the
OpenRLHF backend runs one) :func:`start_replicas` starts :class:`ReplicaServer` actors -- each loads the index from
the shared directory on its own node (CPU, or its GPU for a dense index), checks it, and serves it with the same app
as ``openrlhf-search serve`` (:class:`~.server.RetrievalServer`: uvicorn in a thread of the actor's process) on the
node's address and a free port -- and a small named directory actor that lists their URLs. The OpenRLHF agent in
every vLLM engine asks the directory (:func:`discover`) and spreads its searches over the URLs with the one client,
:class:`~.client.HTTPRetriever` (least requests in flight, failover to another replica, re-probing, a
:class:`~.errors.RetrieverUnavailable` naming every URL when none is left).

Placement (:attr:`ReplicaSpec.replicas`): ``per_node`` -- one replica pinned to every alive node
(``NodeAffinitySchedulingStrategy(soft=False)``); ``N`` -- N replicas spread over the nodes (Ray's ``SPREAD``).
Actors die with the job that started them (the entrypoint's driver); a dead replica is not restarted (its URL would
change), the others take its requests.

Ray is imported only inside the functions: the module is importable where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from . import load_retriever
from .client import resolve_token
from .manifest import Manifest
from .server import RetrievalServer, ServerConfig

REPLICAS_ENV = "OPENRLHF_SEARCH_RETRIEVAL_REPLICAS"
"""Environment variable holding the :class:`ReplicaSpec` JSON the launcher hands to the OpenRLHF entrypoint."""
DIRECTORY_NAME = "openrlhf_search_retrieval"
"""Default name of the directory actor (named actors live in the job's namespace, so concurrent jobs do not mix)."""


def parse_replicas(value: object, key: str = "openrlhf.retrieval_replicas") -> int | str:
    """``"per_node"`` or a replica count >= 0 (0: no replicas) from a config value; ``ValueError`` naming ``key``."""
    text = str(value).strip().lower().replace("-", "_")
    if text == "per_node":
        return "per_node"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{key}={value!r}: expected 'per_node' (one replica on every Ray node), a replica count "
                         ">= 1, or 0 (one server started by the launcher, no replicas)")
    return n


@dataclass
class ReplicaSpec:
    """What to start: the launcher writes it as JSON into :data:`REPLICAS_ENV`, the entrypoint reads it."""

    index: str
    """Index directory (``openrlhf-search index``), at the same path on every node (the shared directory)."""
    replicas: int | str = "per_node"
    """``per_node`` (one on every alive node) or a count (spread over the nodes)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each replica."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each replica (a dense index served from the GPU; 0: CPU)."""
    name: str = DIRECTORY_NAME
    """Name of the directory actor the agents ask for the URLs."""
    host: str = ""
    """Address each replica binds and announces; empty: its node's IP (reachable from the other nodes)."""
    loader_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of ``load_retriever`` (e.g. ``n_threads`` for BM25, ``use_gpu`` for dense)."""
    start_timeout_s: float = 600.0
    """Seconds the replicas may take to load the index and answer; beyond it the start fails, naming them."""

    def __post_init__(self) -> None:
        self.replicas = parse_replicas(self.replicas)
        if self.replicas == 0:
            raise ValueError("ReplicaSpec.replicas=0: nothing to start")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"ReplicaSpec: num_cpus={self.num_cpus}, num_gpus={self.num_gpus} (expected >= 0)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = f"${REPLICAS_ENV}") -> ReplicaSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: invalid JSON for ReplicaSpec: {exc.msg}") from None
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{source}: unknown ReplicaSpec key(s) {unknown}")
        return cls(**data)


class ReplicaServer:
    """The body of one replica actor: load and check the index, serve it on this node, report the URL."""

    def __init__(self, index: str, host: str = "", loader_kwargs: dict | None = None):
        if not host:
            import ray

            host = ray.util.get_node_ip_address()
        retriever = load_retriever(index, **(loader_kwargs or {}))  # checks every index file first
        retriever.search(["warm up"], topk=1)  # JIT / encoder load before the first real request
        cfg = ServerConfig(host=host, port=0, token=resolve_token())
        info = {"method": Manifest.load(index).method, "index": str(index)}
        self.server = RetrievalServer(retriever, cfg, info).start()

    def url(self) -> str:
        """``http://<node address>:<port>`` of this replica."""
        return self.server.url

    def node(self) -> str:
        """The Ray node id this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        self.server.stop()


class ReplicaDirectory:
    """Named actor holding the replicas' URLs (what :func:`discover` reads)."""

    def __init__(self, urls: list[str]):
        self._urls = list(urls)

    def urls(self) -> list[str]:
        return list(self._urls)


@dataclass
class ReplicaSet:
    """Started replicas: the actor handles (kept alive by this object), their URLs and the directory."""

    actors: list
    urls: list[str]
    nodes: list[str]
    directory: object

    def stop(self) -> None:
        """Kill every replica and the directory (they also end with the job)."""
        import ray

        for actor in [*self.actors, self.directory]:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def start_replicas(spec: ReplicaSpec) -> ReplicaSet:
    """Start the replicas of ``spec`` on the running Ray cluster (``ray.init`` done) and the directory actor.

    Raises ``RuntimeError`` naming the replica (and its node) that failed to load the index, or the replicas not up
    within ``start_timeout_s`` (e.g. no node has ``num_cpus``/``num_gpus`` free)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if spec.replicas == "per_node":
        nodes = _alive_nodes()
        if not nodes:
            raise RuntimeError("retrieval replicas: the Ray cluster has no alive node")
        strategies = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
        where = [f"node {n.get('NodeManagerAddress', n['NodeID'])}" for n in nodes]
    else:
        strategies = ["SPREAD"] * int(spec.replicas)
        where = ["spread"] * int(spec.replicas)
    actor_cls = ray.remote(ReplicaServer)
    actors = [actor_cls.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, scheduling_strategy=s,
                                name=f"{spec.name}_{i}", max_concurrency=4)
              .remote(spec.index, spec.host, spec.loader_kwargs) for i, s in enumerate(strategies)]  # fmt: skip
    refs = [a.url.remote() for a in actors]
    deadline = time.monotonic() + spec.start_timeout_s
    urls: list[str] = []
    try:
        for i, ref in enumerate(refs):
            try:
                urls.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"retrieval replica {i} ({where[i]}) did not start within "
                                   f"{spec.start_timeout_s:.0f} s (does a node have {spec.num_cpus:g} CPU(s) and "
                                   f"{spec.num_gpus:g} GPU(s) free? is the index large?)") from None
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
                raise RuntimeError(f"retrieval replica {i} ({where[i]}) failed to serve {spec.index}: "
                                   f"{type(cause).__name__}: {first} (the index must be at this path on every node: "
                                   "put it in the shared directory)") from None
        nodes = ray.get([a.node.remote() for a in actors], timeout=60)
        directory = ray.remote(ReplicaDirectory).options(name=spec.name, num_cpus=0).remote(urls)
        ray.get(directory.urls.remote(), timeout=60)
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    return ReplicaSet(actors=actors, urls=urls, nodes=nodes, directory=directory)


def discover(name: str = DIRECTORY_NAME, timeout: float = 60.0) -> list[str]:
    """The replicas' URLs from the directory actor ``name`` (called in the vLLM engines' agents). Raises
    ``RuntimeError`` naming the actor when it does not exist within ``timeout``."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            directory = ray.get_actor(name)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no retrieval replica directory named {name!r} in this Ray job after "
                                   f"{timeout:.0f} s (the entrypoint starts it before training when "
                                   f"${REPLICAS_ENV} is set)") from None
            time.sleep(0.5)
    return list(ray.get(directory.urls.remote(), timeout=timeout))


_STARTED: list[ReplicaSet] = []
"""Replica sets started by :func:`start_from_env` in this process (their handles keep the actors alive)."""


def start_from_env() -> ReplicaSet | None:
    """Start the replicas described by ``$OPENRLHF_SEARCH_RETRIEVAL_REPLICAS`` (the OpenRLHF entrypoint calls it
    after ``ray.init``); ``None`` when the variable is unset. The handles are kept for the life of the process."""
    text = os.environ.get(REPLICAS_ENV, "")
    if not text:
        return None
    replicas = start_replicas(ReplicaSpec.from_json(text))
    _STARTED.append(replicas)
    print(f"[openrlhf-search] {len(replicas.urls)} retrieval replica(s) serving: {', '.join(replicas.urls)}",
          flush=True)
    return replicas
