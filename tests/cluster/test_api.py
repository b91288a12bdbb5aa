"""The HTTP API's request model, job records and deployment configs, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cineray.cluster import api
from cineray.cluster.api import ApiError, parse_request
from cineray.cluster.jobstore import JobStore, new_job, new_job_id


def test_openai_shaped_request_maps_to_a_generation_request():
    req = parse_request({"prompt": "a red ball falling", "model": "cineray-tiny",
                         "size": "64x32", "seconds": "2", "camera": {"motion": "pan_left"}})
    record = api.to_record(req, seed=7)
    assert (record["width"], record["height"], record["frames"], record["seed"]) == (64, 32, 17, 7)
    gen = api.generation_request(record)
    assert (gen.width, gen.height, gen.frames, gen.camera, gen.seed) == (64, 32, 17, "pan_left", 7)
    assert api.output_frames({**record, "upscale": "full"}) == 33
    assert gen.hold_background  # on by default; it acts on a still camera only
    still = parse_request({"prompt": "a ball", "camera": {"motion": "static",
                                                          "hold_background": False}})
    assert not api.generation_request(api.to_record(still, seed=1)).hold_background
    assert gen.camera_guidance is None  # the checkpoint's sampler.json decides
    zoom = parse_request({"prompt": "a ball", "camera": {"motion": "zoom_out", "guidance": 1.5}})
    assert api.generation_request(api.to_record(zoom, seed=1)).camera_guidance == 1.5


def test_a_cli_request_crosses_the_http_body_unchanged():
    from cineray.cluster.local import request_body
    from cineray.pipelines.stages import GenerationRequest

    sent = GenerationRequest("a ball", seed=3, camera="zoom_out", camera_speed=0.1,
                             camera_guidance=1.5, guidance=2.0, steps=12, hold_background=False)
    got = api.generation_request(api.to_record(parse_request(request_body(sent)), seed=3))
    assert vars(got) == vars(sent)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a ball", "size": "64"}, "size"),
    ({"prompt": "a ball", "n": 5}, "n"),
    ({"prompt": "a ball", "camera": {"speed": -1}}, "camera.speed"),
    ({"prompt": "a ball", "camera": "{not json"}, "camera"),
    ({"prompt": "a ball", "camera": {"hold_background": "maybe"}}, "camera.hold_background"),
    ({"prompt": "a ball", "camera": {"guidance": -1}}, "camera.guidance"),
    ({"prompt": "a ball", "upscale": "4k"}, "upscale"),
    ({"prompt": "a ball", "model": "sora-2"}, "model"),
    ({"size": "32x32"}, "prompt"),
    ({"prompt": "a ball", "callback_url": "ftp://x"}, "callback_url"),
])
def test_bad_fields_are_422_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_request(body)
    assert e.value.status == 422 and e.value.body["error"]["param"] == param


def test_generation_errors_map_to_api_fields():
    record = api.to_record(parse_request({"prompt": "a ball", "camera": {"motion": "spin"}}))
    with pytest.raises(ValueError) as e:
        api.generation_request(record)
    assert api.param_of(str(e.value)) == "camera.motion"


def test_budget_is_413_stating_the_limit():
    record = api.to_record(parse_request({"prompt": "a ball", "frames": 100, "size": "64x64"}))
    api.budget_check(record, 100 * 64 * 64)
    with pytest.raises(ApiError) as e:
        api.budget_check(record, 100 * 64 * 64 - 1)
    assert e.value.status == 413 and "409,599" in e.value.body["error"]["message"]


@pytest.mark.parametrize("which", ["local_storage", "s3_storage"])
def test_job_records_survive_a_new_store(which, request):
    storage = request.getfixturevalue(which)
    jobs = JobStore(storage)
    ids = []
    for i in range(3):
        job = new_job(new_job_id(), {"prompt": f"p{i}"}, model="cineray-tiny", size="32x32",
                      frames=17, fps=8.0, seconds=2.125)
        job["created_at"] += i
        ids.append(jobs.put(job)["id"])
    again = JobStore(storage)  # what a restarted ingress sees
    listed, more = again.list(limit=2)
    assert [j["id"] for j in listed] == ids[::-1][:2] and more
    again.update(ids[0], status="in_progress", progress=40)
    again.request_cancel(ids[0])
    assert again.get(ids[0])["status"] == "cancelled"  # before the orchestrator acknowledges
    with pytest.raises(KeyError):
        again.get("video_" + "0" * 24)
    with pytest.raises(KeyError):
        again.get("../../etc/passwd")


@pytest.mark.parametrize("path", ["infra/serve/local.yaml", "infra/serve/gpu.yaml"])
def test_serve_configs_validate(path):
    from ray.serve.schema import ServeDeploySchema

    from cineray.cluster.app import STAGE_LIMITS, AppArgs

    config = yaml.safe_load((Path(__file__).parents[2] / path).read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "cineray.cluster.app:build"
    AppArgs(**app.args)  # the builder's typed args accept them
    assert {d.name for d in app.deployments} <= set(STAGE_LIMITS) | {"Ingress", "Orchestrator"}


def test_builder_takes_typed_key_value_args(tmp_path):
    """`serve run cineray.cluster.app:build key=value`: Serve parses the strings into AppArgs."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from cineray.cluster.app import AppArgs, build

    app = call_user_app_builder_with_args_if_necessary(
        build, {"storage_root": str(tmp_path), "token": "t", "denoiser_max_replicas": "3"})
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="queue_limit"):
        call_user_app_builder_with_args_if_necessary(build, {"queue_limit": "many"})
    with pytest.raises(ValueError, match="denoiser_max_replicas"):
        AppArgs(denoiser_min_replicas=3, denoiser_max_replicas=2)
