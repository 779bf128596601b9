"""Starts the engine replicas on Ray Serve: joins the Ray cluster at `ray_address`, or starts
one in this process; deploys N replicas of the engine with the chosen router; returns the
ClusterEngine the HTTP server talks to. Ray Serve's own HTTP proxy stays off: pikaserve's
server (its API, limits, metrics) is the one endpoint."""

from __future__ import annotations

import importlib.util
import logging
import uuid
from typing import Any

from pikaserve.config import ConfigError, EngineConfig, ServerConfig, default_num_threads

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "engine"
# Requests a replica takes at once: its own scheduler queues and batches them, so the router
# never holds a request back for a replica's sake.
MAX_ONGOING_PER_REPLICA = 4096
HEALTH_CHECK_PERIOD_S = 2.0


def replica_threads(engine_config: EngineConfig, server_config: ServerConfig) -> int | None:
    """CPU threads per replica: as configured; on a local cluster the cores shared out, so
    that replicas on one machine do not fight over them; elsewhere all of their machine's."""
    if engine_config.num_threads is not None or server_config.ray_address is not None:
        return engine_config.num_threads
    return max(1, default_num_threads() // server_config.replicas)


def replica_gpus(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """GPUs each replica asks Ray for: one on CUDA (Ray then shows the replica that GPU alone,
    as its cuda:0), none on CPUs. ConfigError for what replicas cannot do yet: share a GPU,
    or be pinned to cuda:N (choose GPUs with CUDA_VISIBLE_DEVICES instead)."""
    import torch

    device = engine_config.device
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with replicas: each replica gets a GPU of its "
                          "own from Ray; choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return 0  # auto on a machine without CUDA: CPU replicas (say --device cuda to join GPUs)
    local = server_config.ray_address is None
    if local and torch.cuda.device_count() < server_config.replicas:
        raise ConfigError(f"{server_config.replicas} replicas need {server_config.replicas} "
                          f"GPUs, one each; this machine has {torch.cuda.device_count()} "
                          "(replicas do not share a GPU yet)")
    return 1


def check_cluster(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """ConfigError unless Ray Serve is installed and the replicas can be placed (checked
    before the server binds its port)."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ConfigError('--replicas and --ray-address run on Ray Serve: '
                          'pip install "pikaserve[cluster]"')
    replica_gpus(engine_config, server_config)


def start_cluster(engine_config: EngineConfig, server_config: ServerConfig):
    """Blocks until every replica has loaded the model; returns a ClusterEngine."""
    check_cluster(engine_config, server_config)
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from pikaserve.cluster.client import ClusterEngine
    from pikaserve.cluster.replica import EngineReplica
    from pikaserve.cluster.router import ReplicaRouter

    router: dict[str, Any] = {  # the class by import path: the controller imports it
        "request_router_class": f"{ReplicaRouter.__module__}.{ReplicaRouter.__qualname__}",
        "request_router_kwargs": {
            "policy": server_config.routing,
            "block_size": engine_config.block_size,
            "imbalance_threshold": server_config.routing_imbalance_threshold,
        },
    }
    threads = replica_threads(engine_config, server_config)
    config = engine_config.replace(num_threads=threads)
    if not ray.is_initialized():
        local = server_config.ray_address is None
        # a local instance gets a CPU for every replica's threads even on a small machine
        cpus = max(default_num_threads(), server_config.replicas * (threads or 1)) if local else None
        ray.init(address=server_config.ray_address, num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=server_config.replicas,
        max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
        ray_actor_options={"num_cpus": threads or 1,
                           "num_gpus": replica_gpus(engine_config, server_config)},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        logging_config={"enable_access_log": False},  # the HTTP server logs requests
        request_router_config=RequestRouterConfig(**router),
    )(EngineReplica)
    logger.info("starting %d engine replicas on Ray Serve (%s routing, %s threads each)",
                server_config.replicas, server_config.routing, threads or "all")
    # an app of its own: several servers may share one Ray cluster
    app_name = f"pikaserve-{uuid.uuid4().hex[:8]}"
    handle = serve.run(deployment.bind(config), name=app_name, route_prefix=None)
    info = handle.describe.remote().result()
    return ClusterEngine(handle, info, app_name, DEPLOYMENT_NAME, server_config.replicas)


def stop_cluster(server_config: ServerConfig) -> None:
    """Stops the Ray instance this process started (Serve and what is left of the replicas
    with it); a joined cluster keeps running (the server deleted its app on shutdown)."""
    import ray

    if server_config.ray_address is None and ray.is_initialized():
        ray.shutdown()
