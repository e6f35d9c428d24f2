"""Joining a Ray cluster, and what one worker holds there: the seam `render --ray` and `serve` share (docs/scaleout.md).

Ray is an optional extra (`pip install 'walt-export[ray]'`, Ray Serve included): nothing here imports it before it is
needed, so `import runtime` and the local commands work without it, and a Ray flag without it is one line naming the
extra. Every node of a cluster runs the same walt-export and reads the artifact directory (and writes the outputs) at
the same path: a shared filesystem (docs/scaleout.md §2).

A worker is one `Pipeline` on one device: a GPU worker (the TensorRT backend, or onnxruntime on cuda/tensorrt)
reserves one GPU, and Ray gives it that GPU alone (CUDA_VISIBLE_DEVICES), so its models run on its device 0; a CPU
worker reserves `cpus` CPUs and runs its models on that many threads (unless --threads says otherwise).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from runtime.errors import WaltExportError, import_optional
from runtime.pipeline import PipelineSettings

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'walt-export[ray]'"
CONNECT_TIMEOUT_S = 10  # for a cluster's address to accept a connection
LOCAL = "local"  # `--ray` without an address: start a Ray instance on this machine for the run


class ClusterError(WaltExportError, ConnectionError):
    """A Ray cluster that cannot be joined, or that has no room for one worker; the message says what to start."""


class WorkerResources(BaseModel):
    """What one worker reserves in the cluster: Ray's `num_cpus` / `num_gpus` actor options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float
    num_gpus: float = 0

    @property
    def kind(self) -> str:
        return "GPU" if self.num_gpus else "CPU"


def import_ray():
    """The `ray` module, or MissingDependencyError naming the extra that installs it."""
    return import_optional("ray", RAY_EXTRA)


def connect(address: str, verbose: bool = False):
    """Join the Ray cluster at `address` (`auto`: the one this machine's `ray start` made or RAY_ADDRESS names; a
    `host:port` or `ray://host:port`; `local`: start one on this machine, with every CPU and GPU it has) and return
    the `ray` module; a process already connected stays connected.

    Raises ClusterError when no cluster answers there, MissingDependencyError without Ray.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address not in (LOCAL, "auto"):
        _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.INFO if verbose else logging.WARNING)
    except ConnectionError as e:
        auth = "" if address in (LOCAL, "auto") or os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster uses token authentication (Ray's default when it has a token), set RAY_AUTH_MODE=token "
            "and give its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)")
        raise ClusterError(f"cannot join a Ray cluster at --ray {address} ({e}){auth}; start one with `ray start "
                           "--head` on the head node, or give --ray without an address for a local one") from None
    log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    return ray


def _probe(address: str) -> None:
    """ClusterError at once when nothing listens at a HOST:PORT (or ray://HOST:PORT) address; Ray itself would
    retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        raise ClusterError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at --ray {address} ({e.strerror or e}); start one with `ray "
                           "start --head` there, or give --ray without an address for a local one") from None


def uses_gpu(settings: PipelineSettings) -> bool:
    """Whether a pipeline with these settings runs its models on a GPU (TensorRT, or onnxruntime's cuda/tensorrt
    devices)."""
    return settings.backend == "tensorrt" or settings.device != "cpu"


def worker_resources(settings: PipelineSettings, cpus: float) -> WorkerResources:
    """One GPU for a GPU worker (its CPU share: Ray's default for actors, none reserved), else `cpus` CPUs."""
    return WorkerResources(num_cpus=0, num_gpus=1) if uses_gpu(settings) else WorkerResources(num_cpus=cpus)


def worker_settings(settings: PipelineSettings, resources: WorkerResources) -> PipelineSettings:
    """What each worker (or replica) opens, made on the driver: the artifact's absolute path (a worker's working
    directory is not the driver's), and for a CPU worker threads = the CPUs it reserved (at least 1) unless the user
    set --threads."""
    update = {"artifacts": str(Path(settings.artifacts).absolute())}
    if not resources.num_gpus and not settings.threads:
        update["threads"] = max(1, int(resources.num_cpus))
    return settings.model_copy(update=update)


def worker_count(ray, resources: WorkerResources, wanted: int | None, work: int) -> int:
    """Workers to start: `wanted` (workers the cluster has no room for yet wait for it, e.g. for an autoscaler), or
    as many as it has room for (its GPUs, or its CPUs / the CPUs of one); never more than there are `work` units.

    Raises ClusterError when `wanted` is None and the cluster has no room for one worker.
    """
    if wanted is None:
        total = ray.cluster_resources()
        wanted = int(total.get("GPU", 0) // resources.num_gpus) if resources.num_gpus else \
            int(total.get("CPU", 0) // resources.num_cpus)
        if wanted < 1:
            have = f"{total.get('GPU', 0):g} GPUs" if resources.num_gpus else f"{total.get('CPU', 0):g} CPUs"
            need = "1 GPU" if resources.num_gpus else f"{resources.num_cpus:g} CPUs (--worker-cpus)"
            raise ClusterError(f"the Ray cluster has {have}; one {resources.kind} worker needs {need}: add nodes, "
                               "or lower --worker-cpus")
    return max(1, min(wanted, work))
