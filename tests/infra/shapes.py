"""Resource shapes: what a KubeRay worker group offers, what a Serve replica asks for, and
whether a set of asks packs onto a set of nodes.

A node's Ray resources follow KubeRay's rules (controllers/ray/common/pod.go): rayStartParams
num-cpus / num-gpus / memory when given, else the Ray container's limits (cpu, nvidia.com/gpu,
memory). A replica's follow Serve's: the config file's ray_actor_options and autoscaling_config
replace the code's, by deployment name (serve/_private/application_state.py), and a replica
that names no num_cpus reserves one CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass

_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1 << 10, "Mi": 1 << 20,
          "Gi": 1 << 30, "Ti": 1 << 40, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "32Gi", 8) as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Node:
    """Resources of one node (or one ask: a replica, an actor, a train worker)."""

    name: str
    cpus: float = 0.0
    gpus: float = 0.0
    memory: float = 0.0  # bytes; 0 in an ask = no memory reservation

    def fits(self, node: Node) -> bool:
        eps = 1e-9
        return (self.cpus <= node.cpus + eps and self.gpus <= node.gpus + eps
                and self.memory <= node.memory + eps)


def group_node(name: str, group: dict) -> Node:
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return Node(name,
                cpus=quantity(params.get("num-cpus", limits.get("cpu", 0))),
                gpus=quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
                memory=quantity(params.get("memory", limits.get("memory", 0))))


def cluster_nodes(spec: dict, size: str = "maxReplicas") -> list[Node]:
    """Every node of a RayCluster spec when each worker group has `size` pods (maxReplicas: the
    autoscaler's ceiling; replicas: a fixed-size job cluster)."""
    nodes = [group_node("head", spec["headGroupSpec"])]
    for g in spec["workerGroupSpecs"]:
        nodes += [group_node(g["groupName"], g) for _ in range(g[size])]
    return nodes


def serve_replicas(config: dict) -> list[tuple[str, Node, int]]:
    """(deployment, ask of one replica, max replicas) for every deployment of every application
    in a Serve config, built the way Serve's build task builds it."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    out = []
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        built = build_app(call_user_app_builder_with_args_if_necessary(
            builder, app.get("args", {})), name=app["name"])
        overrides = {d["name"]: d for d in app.get("deployments", [])}
        for d in built.deployments:
            o = overrides.get(d.name, {})
            actor = o.get("ray_actor_options", d.ray_actor_options or {})
            auto = o.get("autoscaling_config")
            if auto is None and d._deployment_config.autoscaling_config is not None:
                auto = dataclasses.asdict(d._deployment_config.autoscaling_config) \
                    if dataclasses.is_dataclass(d._deployment_config.autoscaling_config) \
                    else d._deployment_config.autoscaling_config.model_dump()
            count = auto["max_replicas"] if auto else o.get("num_replicas", d.num_replicas)
            ask = Node(d.name, cpus=actor.get("num_cpus", 1), gpus=actor.get("num_gpus", 0),
                       memory=actor.get("memory", 0))
            out.append((d.name, ask, int(count)))
    return out


def pack(asks: list[tuple[str, Node]], nodes: list[Node]) -> str | None:
    """First-fit decreasing: None if every ask gets a place, else what did not fit.

    A feasible packing proves the asks fit; first-fit can miss a packing that exists, so a
    failure means "tight or impossible" and names the first ask left over."""
    free = [dataclasses.replace(n) for n in nodes]
    order = sorted(asks, key=lambda a: (a[1].gpus, a[1].cpus, a[1].memory), reverse=True)
    for name, ask in order:
        for n in free:
            if ask.fits(n):
                n.cpus, n.gpus, n.memory = n.cpus - ask.cpus, n.gpus - ask.gpus, \
                    n.memory - ask.memory
                break
        else:
            left = sum(1 for _ in order)  # for the message: the total asked
            return (f"{name} ({ask.cpus} CPU, {ask.gpus} GPU) does not fit: {left} asks on "
                    f"{len(nodes)} nodes; free now: "
                    f"{[(n.name, round(n.cpus, 2), round(n.gpus, 2)) for n in free]}")
    return None
