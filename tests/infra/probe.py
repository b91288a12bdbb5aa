"""A driver that runs inside a Ray node's network namespace and answers JSON commands.

    python -m tests.infra.probe --address 10.231.0.1:6379     (one JSON object per line in/out)

The multi-node test sits outside the namespaces, so it cannot reach the cluster directly; it
starts this probe inside the head's namespace (NamespaceCluster.run_in / exec_argv) and sends it
commands over stdin. One long-lived connected driver answers every question, instead of paying
Ray's import and connect time per question. Commands:

    {"cmd": "nodes"}                               -> {"alive": [ip, ...]}
    {"cmd": "replicas"}                            -> {"Deployment": [node ip, ...], ...}
    {"cmd": "wait_app", "app": A, "wait_s": s, "alive_ips": [ip, ...], "counts": {D: n}}
        waits until Serve reports A RUNNING, every deployment HEALTHY, every live replica sits
        on one of alive_ips and deployment D has at least n of them (counts is optional: the
        controller may report HEALTHY for a moment after a node died); -> replicas
    {"cmd": "http", "method": M, "url": U, "json": {...}, "headers": {...}, "timeout": s}
        -> {"status", "headers", "text" (if not binary), "size", "sha256", "head" (hex, 16 B)}
Errors come back as {"error": "..."}; the probe keeps running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time


def _replicas() -> dict[str, list[str]]:
    from ray._private import state

    out: dict[str, list[str]] = {}
    for actor in state.actors().values():
        name = actor["ActorClassName"]
        if actor["State"] == "ALIVE" and name.startswith("ServeReplica:"):
            deployment = name.rsplit(":", 1)[-1]
            out.setdefault(deployment, []).append(actor["Address"]["IPAddress"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def _alive_ips() -> list[str]:
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])


def _app_ready(app: str) -> tuple[bool, str]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return False, f"application {app!r} not deployed yet"
    unhealthy = {name: d.status for name, d in status.deployments.items() if d.status != "HEALTHY"}
    if status.status != "RUNNING" or unhealthy:
        return False, f"{app}: {status.status} {unhealthy} {status.message[-300:]}"
    return True, "running"


def wait_app(app: str, timeout: float, alive_ips: list[str], counts: dict[str, int]) -> dict:
    deadline, why = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        ready, why = _app_ready(app)
        replicas = _replicas()
        stray = {d: ips for d, ips in replicas.items() if set(ips) - set(alive_ips)}
        short = {d: len(replicas.get(d, [])) for d, n in counts.items()
                 if len(replicas.get(d, [])) < n}
        if ready and not stray and not short:
            return replicas
        if ready:
            why = f"replicas on other nodes: {stray}; too few replicas: {short} of {counts}"
        time.sleep(1.0)
    raise TimeoutError(f"after {timeout:.0f} s: {why}")


def http(method: str, url: str, json_body=None, headers=None, timeout: float = 30.0) -> dict:
    import httpx

    r = httpx.request(method, url, json=json_body, headers=headers or {}, timeout=timeout)
    body = r.content
    kind = r.headers.get("content-type", "")
    text = body.decode(errors="replace") if "json" in kind or "text" in kind else None
    return {"status": r.status_code, "headers": dict(r.headers), "text": text,
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "head": body[:16].hex()}


def handle(msg: dict):
    cmd = msg["cmd"]
    if cmd == "nodes":
        return {"alive": _alive_ips()}
    if cmd == "replicas":
        return _replicas()
    if cmd == "wait_app":
        return wait_app(msg["app"], msg["wait_s"], msg["alive_ips"], msg.get("counts", {}))
    if cmd == "http":
        return http(msg["method"], msg["url"], msg.get("json"), msg.get("headers"),
                    msg.get("timeout", 30.0))
    raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    a = p.parse_args()
    ray.init(address=a.address, logging_level="ERROR", log_to_driver=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as e:  # report and keep serving: the test decides what is fatal
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
