"""What can be checked about infra/ without Docker, Kubernetes or a cloud account.

- every manifest parses; the KubeRay ones validate against KubeRay's own CRD schemas (with
  unknown fields rejected, which the cluster would silently drop), the launcher YAML against
  Ray's cluster-launcher schema, the Helm values against the chart's keys;
- the RayService embeds exactly infra/serve/gpu.yaml and infra/kuberay/raycluster.yaml;
- that Serve config validates with ray.serve.schema.ServeDeploySchema, its import path builds
  the application the way Serve calls a builder, and the deployments it names exist;
- every Serve replica (at its max replica count) and every job worker fits the worker groups;
- RayJob entrypoints name modules whose --help runs, and their config overrides resolve;
- the Dockerfile's base tag, pinned versions and copied paths match this checkout.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml

from tests.infra import kuberay_schema
from tests.infra.shapes import Node, cluster_nodes, pack, serve_replicas

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
RAY_MANIFESTS = ["raycluster.yaml", "rayservice.yaml", "rayjob-train.yaml",
                 "rayjob-batch-render.yaml"]
STAGES = {"Ingress", "SafetyFilter", "TextEncoder", "Planner", "Denoiser", "Decoder",
          "UpscalerSpatial", "UpscalerTemporal", "Watermarker", "Muxer"}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _manifest(name: str) -> dict:
    return _load(KUBERAY / name)


def _serve_config() -> dict:
    return yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])


# Parsing and schemas -----------------------------------------------------------------------------
def test_every_manifest_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.name for f in files} >= {*RAY_MANIFESTS, "operator-values.yaml", "aws.yaml",
                                       "gpu.yaml", "local.yaml"}
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) and d for d in docs), f


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_kuberay_manifest_matches_crd_schema(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    schema = kuberay_schema.strict(kuberay_schema.load()["crds"][doc["kind"]])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors


def test_crd_check_rejects_a_misspelled_field():
    """The schema check is not vacuous: a typo KubeRay would drop without a word fails here."""
    doc = copy.deepcopy(_manifest("raycluster.yaml"))
    doc["spec"]["enableInTreeAutoscalling"] = doc["spec"].pop("enableInTreeAutoscaling")
    schema = kuberay_schema.strict(kuberay_schema.load()["crds"]["RayCluster"])
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        jsonschema.validate(doc, schema)


def _keys(d: dict, prefix=()) -> set[tuple]:
    out = set()
    for k, v in d.items():
        out.add((*prefix, k))
        if isinstance(v, dict) and v:
            out |= _keys(v, (*prefix, k))
    return out


def test_operator_helm_values_use_the_charts_keys():
    ours, chart = _manifest("operator-values.yaml"), kuberay_schema.load()["values"]
    # A key may go below one whose default is an empty map (free-form, e.g. nodeSelector) or
    # below `resources` (a Kubernetes ResourceRequirements; the chart leaves requests commented).
    free = {k for k in _keys(chart) if _get(chart, k) == {}} | {("resources",)}
    unknown = [k for k in _keys(ours) if k not in _keys(chart)
               and not any(k[:len(f)] == f for f in free)]
    assert not unknown, f"keys the kuberay-operator chart does not have: {unknown}"
    gates = {g["name"] for g in chart["featureGates"]}
    assert {g["name"] for g in ours["featureGates"]} <= gates
    assert ours["image"]["tag"] == kuberay_schema.load()["kuberay"]


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


def test_launcher_config_validates_with_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(INFRA / "launcher" / "aws.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0
               for t in types.values()), "a GPU node type that scales from zero"
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# The RayService and its Serve config -------------------------------------------------------------
def test_rayservice_embeds_gpu_serve_config_and_cluster_spec():
    spec = _manifest("rayservice.yaml")["spec"]
    assert spec["serveConfigV2"] == (INFRA / "serve" / "gpu.yaml").read_text()
    assert spec["rayClusterConfig"] == _manifest("raycluster.yaml")["spec"]
    r = subprocess.run([sys.executable, str(KUBERAY / "render.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_render_check_notices_drift(tmp_path, monkeypatch):
    sys.path.insert(0, str(KUBERAY))
    try:
        render = importlib.import_module("render")
    finally:
        sys.path.remove(str(KUBERAY))
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(render.OUT.read_text().replace("use_gpu: true", "use_gpu: false"))
    monkeypatch.setattr(render, "OUT", stale)
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0 and render.main(["--check"]) == 0


@pytest.mark.parametrize("name", ["rayservice.yaml", "local.yaml"])
def test_serve_config_validates_and_names_real_deployments(name, monkeypatch):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("CINERAY_API_TOKEN", "test-token")  # else build() prints a new one
    raw = _serve_config() if name == "rayservice.yaml" else _load(INFRA / "serve" / name)
    config = ServeDeploySchema.model_validate(raw)
    for app in config.applications:
        module, attr = app.import_path.split(":")
        builder = getattr(importlib.import_module(module), attr)
        # Exactly what Serve's build task does with the config's args.
        built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args),
                          name=app.name)
        names = {d.name for d in built.deployments}
        assert STAGES <= names
        assert {d.name for d in app.deployments} <= names


def test_rayservice_serves_on_the_ports_its_pods_open():
    serve = _serve_http(_serve_config())
    spec = _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    ports = {p["name"]: p["containerPort"]
             for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert serve == ("0.0.0.0", ports["serve"]) and ports["dashboard"] == 8265
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas on workers


def _serve_http(raw: dict) -> tuple[str, int]:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    assert config.proxy_location == "EveryNode"  # every node answers behind the k8s Service
    return config.http_options.host, config.http_options.port


def test_serve_replicas_fit_the_worker_groups(monkeypatch):
    monkeypatch.setenv("CINERAY_API_TOKEN", "test-token")
    replicas = serve_replicas(_serve_config())
    nodes = cluster_nodes(_manifest("raycluster.yaml")["spec"])
    for name, demand, _ in replicas:
        assert any(demand.fits(n) for n in nodes), f"{name} {demand} fits no worker group"
    need = [(name, demand) for name, demand, count in replicas for _ in range(count)]
    assert pack(need, nodes) is None, pack(need, nodes)
    assert any(n.gpus for n in nodes) and all(
        g["minReplicas"] == 0 for g in _manifest("raycluster.yaml")["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])


def test_packing_reports_what_does_not_fit():
    nodes = [Node("gpu-1x", cpus=8, gpus=1, memory=32 << 30)]
    need = [("Denoiser", Node("", cpus=2, gpus=1)), ("Denoiser", Node("", cpus=2, gpus=1))]
    assert "Denoiser" in pack(need, nodes)
    assert pack(need[:1], nodes) is None


# RayJobs -----------------------------------------------------------------------------------------
def _entrypoint(name: str) -> list[str]:
    return shlex.split(_manifest(name)["spec"]["entrypoint"])


def _config_args(argv: list[str]) -> tuple[str, list[str]]:
    """(--config value, overrides) from a cineray job command line: `key=value` positionals
    (jobs.train) or `--set key=value` (jobs.batch_render)."""
    preset, overrides, it = "tiny", [], iter(argv)
    for tok in it:
        if tok == "--config":
            preset = next(it)
        elif tok == "--set":
            overrides.append(next(it))
        elif tok.startswith("--"):
            next(it)
        elif "=" in tok:
            overrides.append(tok)
    return preset, overrides


@pytest.mark.parametrize("name,module", [("rayjob-train.yaml", "cineray.jobs.train"),
                                         ("rayjob-batch-render.yaml",
                                          "cineray.jobs.batch_render")])
def test_rayjob_entrypoint_runs_a_real_module(name, module):
    from cineray.config import load_config

    argv = _entrypoint(name)
    assert argv[:3] == ["python", "-m", module]
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    flags = {t for t in argv[3:] if t.startswith("--")}
    assert flags <= set(re.findall(r"--[a-z][a-z-]*", r.stdout)), (flags, r.stdout)
    cfg = load_config(*_config_args(argv[3:]))  # every override names a real, valid field
    assert cfg.storage.root.startswith("s3://")


def test_training_job_fits_its_cluster():
    from cineray.config import load_config

    cfg = load_config(*_config_args(_entrypoint("rayjob-train.yaml")[3:]))
    tc = cfg.train
    assert tc.use_gpu and tc.component == "denoiser" and tc.precision == "bf16"
    spec = _manifest("rayjob-train.yaml")["spec"]["rayClusterSpec"]
    nodes = cluster_nodes(spec, size="replicas")
    worker = Node("train worker", cpus=tc.cpus_per_worker, gpus=1)
    assert pack([("train", worker)] * tc.num_workers, nodes) is None
    gpus = sum(n.gpus for n in nodes)
    assert gpus == tc.num_workers, f"{gpus} GPUs in the job's cluster, {tc.num_workers} workers"
    spare = sum(n.cpus for n in nodes) - tc.num_workers * tc.cpus_per_worker
    assert tc.data.cache or spare >= tc.data.decode_cpus  # jobs.train._check_cpus's rule


def test_batch_job_pools_fit_its_cluster():
    from cineray.config import load_config

    cfg = load_config(*_config_args(_entrypoint("rayjob-batch-render.yaml")[3:]))
    nodes = cluster_nodes(_manifest("rayjob-batch-render.yaml")["spec"]["rayClusterSpec"])
    need = []
    for stage in ("text", "denoise", "decode", "upscale", "package"):
        pool = getattr(cfg.batch, stage)
        need += [(stage, Node(stage, cpus=pool.num_cpus, gpus=pool.num_gpus))] * pool.max
    assert pack(need, nodes) is None, pack(need, nodes)
    assert cfg.batch.denoise.num_gpus > 0


# The image ----------------------------------------------------------------------------------------
def _dockerfile() -> list[str]:
    """Instructions of infra/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerfile_base_image_and_pins_match_this_checkout():
    lines = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), re.M))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    (base,) = [ln for ln in lines if ln.startswith("FROM rayproject/")]
    assert base == "FROM rayproject/ray:${RAY_VERSION}-py311-gpu"
    assert any('-e ".[gpu]"' in ln for ln in lines)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^gpu = \[", pyproject, re.M), "pyproject.toml has no 'gpu' extra"


def test_dockerfile_paths_exist():
    lines = _dockerfile()
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    for ln in lines:
        if ln.startswith("COPY") and "--from=" not in ln:
            *sources, _dest = [t for t in ln.split()[1:] if not t.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
                top = src.split("/")[0]
                assert f"!{src}" in ignore or f"!{src}/" in ignore or f"!{top}/" in ignore, \
                    f"Dockerfile.dockerignore keeps {src} out of the build context"
    (entry,) = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    path = yaml.safe_load(entry.split(None, 1)[1])[0]
    assert path.startswith("/opt/cineray/")  # where `COPY infra infra` lands (WORKDIR)
    script = ROOT / path.removeprefix("/opt/cineray/")
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script} not executable"
    # The default command is a real `cineray` command with real options.
    (cmd,) = [yaml.safe_load(ln.split(None, 1)[1]) for ln in lines if ln.startswith("CMD")]
    assert cmd[0] == "cineray"
    exe = Path(sys.executable).with_name("cineray")
    r = subprocess.run([str(exe), cmd[1], "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {t for t in cmd[2:] if t.startswith("--")} <= set(re.findall(r"--[a-z-]+", r.stdout))
    # Weights land where the GPU Serve config looks for them.
    ckpt = _serve_config()["applications"][0]["args"]["checkpoint"]
    assert f"ENV CINERAY_WEIGHTS_DIR={ckpt}" in " ".join(lines) and ckpt in cmd
    assert any(ln == f"COPY checkpoints/cineray-tiny {ckpt}" for ln in lines)


def _pod_specs(node, path=()):
    """Every pod spec (`template.spec`) inside a manifest, with where it sits."""
    if isinstance(node, dict):
        if "containers" in node:
            yield path, node
        for k, v in node.items():
            yield from _pod_specs(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_specs(v, (*path, i))


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_no_volume_hides_the_weights(name):
    """A volume mounted at or above the weights folder would hide the baked-in weights (and the
    app would fall back to random ones with only a warning)."""
    weights = Path(_serve_config()["applications"][0]["args"]["checkpoint"])
    for where, pod in _pod_specs(_manifest(name)):
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                mount = Path(m["mountPath"])
                assert mount != weights and mount not in weights.parents, (where, m)
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("CINERAY_WEIGHTS_DIR", str(weights)) == str(weights), where


def test_manifests_use_one_image_and_this_ray_version():
    images = set()
    for name in RAY_MANIFESTS:
        text = (KUBERAY / name).read_text()
        images |= set(re.findall(r"image: (\S+)", text))
        assert re.findall(r'rayVersion: "([^"]+)"', text) and \
            set(re.findall(r'rayVersion: "([^"]+)"', text)) == {ray.__version__}, name
    images.add(_load(INFRA / "launcher" / "aws.yaml")["docker"]["image"])
    assert len(images) == 1, images
