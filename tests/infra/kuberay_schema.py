"""KubeRay's own schemas for the manifest tests, kept small enough to ship with the tests.

tests/infra/kuberay-v1.7.0.json holds, from KubeRay v1.7.0's Helm chart:
  crds:   the v1 openAPIV3Schema of RayCluster, RayJob and RayService, descriptions dropped and
          every embedded core/v1 PodTemplateSpec (`template`, `submitterPodTemplate`) cut to
          {"type": "object"} (the rest of KubeRay's spec is kept whole);
  values: the kuberay-operator chart's default values.yaml (the keys a values file may set).
Regenerate it from a KubeRay checkout:

    python -m tests.infra.kuberay_schema /path/to/kuberay v1.7.0

Kubernetes drops unknown fields of a structural schema instead of rejecting them, so a typo in a
manifest is silently ignored by the cluster; `strict()` turns that into a validation error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

SCHEMA_FILE = Path(__file__).with_name("kuberay-v1.7.0.json")
POD_TEMPLATES = ("template", "submitterPodTemplate")
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def load() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def strict(schema):
    """A copy of ``schema`` where objects with declared properties allow no others."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _trim(node):
    if isinstance(node, list):
        return [_trim(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: ({"type": "object"} if name in POD_TEMPLATES else _trim(sub))
                        for name, sub in value.items()}
        else:
            out[key] = _trim(value)
    return out


def build(kuberay: Path, ref: str) -> dict:
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(kuberay), "show", f"{ref}:{path}"],
                              check=True, capture_output=True, text=True).stdout

    chart = "helm-chart/kuberay-operator"
    crds = {}
    for kind, plural in KINDS.items():
        crd = yaml.safe_load(show(f"{chart}/crds/ray.io_{plural}.yaml"))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _trim(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)  # written by the operator, never by us
        crds[kind] = schema
    return {"kuberay": ref, "crds": crds, "values": yaml.safe_load(show(f"{chart}/values.yaml"))}


if __name__ == "__main__":
    data = build(Path(sys.argv[1]), sys.argv[2])
    SCHEMA_FILE.with_name(f"kuberay-{sys.argv[2]}.json").write_text(
        json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
