"""HTTP API of `diffsr serve`, with an in-process client: jobs, limits, bad input, cancellation, expiry, token."""

from __future__ import annotations

import io
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'diffsr[server]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from diffsr.cli.main import main  # noqa: E402
from diffsr.server import ServerConfig, create_app  # noqa: E402
from server_helpers import Gate, image_bytes, tiny_model_dir, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture
def gate(monkeypatch):
    gate = Gate()
    gate.install(monkeypatch)
    yield gate
    gate.open.set()  # never leave a worker waiting


def client_for(tmp_path, **config) -> TestClient:
    return TestClient(create_app(ServerConfig(work_dir=tmp_path / "work", **config)))


def submit(client, data: bytes, name: str = "in.png", **opts):
    return client.post("/api/jobs", files={"image": (name, data, "application/octet-stream")},
                       data={"options": json.dumps(opts)})


def finished(client, job_id: str, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (s := client.get(f"/api/jobs/{job_id}").json())["state"] in ("done", "failed", "cancelled") and s,
                    timeout=timeout)


def field_of(response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"][-1]


# ------------------------------------------------------------------------------ happy path


def test_methods_come_from_the_registry_with_the_servers_model_choices(tmp_path, model_dir, gate):
    with client_for(tmp_path, model_dir=model_dir) as client:
        info = client.get("/api/methods").json()
    by_name = {m["name"]: m for m in info["methods"]}
    assert {"feedforward", "gated"} <= set(by_name), "a method added to the registry must appear with no server change"
    props = by_name["feedforward"]["options"]["properties"]
    assert props["tile"]["type"] == "integer" and props["tile"]["minimum"] == 0 and props["tile"]["default"] == 0
    assert props["outscale"]["maximum"] == 16.0 and props["outscale"]["stage"] == "run"
    assert props["model"]["stage"] == "load"
    assert props["model"]["enum"][0] == "realesrgan-x4plus" and "tiny.pth" in props["model"]["enum"]
    assert "device" not in props, "the device is the server's choice"
    assert by_name["gated"]["options"]["properties"]["steps"]["maximum"] == 50
    assert by_name["feedforward"]["default"] is True


def test_openapi_documents_the_api(tmp_path):
    with client_for(tmp_path) as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/api/methods", "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/result"):
        assert path in paths, path
    assert "delete" in paths["/api/jobs/{job_id}"]
    body = paths["/api/jobs"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


def test_a_job_runs_the_tiny_model_and_returns_an_image_four_times_larger(tmp_path, model_dir):
    with client_for(tmp_path, model_dir=model_dir) as client:
        accepted = submit(client, image_bytes(24, 32), model="tiny.pth", tile=16, tile_overlap=4)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert accepted.headers["location"] == f"/api/jobs/{job_id}"
        status = finished(client, job_id)
        assert status["state"] == "done", status
        assert status["progress"] == 1.0 and status["error"] is None
        assert status["options"]["model"] == "tiny.pth" and status["options"]["tile"] == 16
        assert status["result"]["width"] == 128 and status["result"]["height"] == 96
        result = client.get(status["result"]["url"])
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(result.content))
        assert image.size == (128, 96)
        assert "diffsr" in image.info, "the run's settings are recorded in the PNG"
        original = client.get(status["input"]["url"])
        assert original.content == image_bytes(24, 32)


def test_result_keeps_the_input_format_or_the_requested_one(tmp_path, model_dir):
    jpeg = image_bytes(16, 16, fmt="JPEG")
    with client_for(tmp_path, model_dir=model_dir) as client:
        same = finished(client, submit(client, jpeg, name="photo.png", model="tiny.pth").json()["id"])
        png = finished(client, submit(client, jpeg, name="photo.jpg", model="tiny.pth", output_format="png").json()["id"])
        assert same["input"]["format"] == "JPEG", "content is sniffed, not the file name"
        assert same["result"]["format"] == "JPEG" and client.get(same["result"]["url"]).content[:2] == b"\xff\xd8"
        assert png["result"]["media_type"] == "image/png"
        assert client.get(png["result"]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"


def test_events_stream_reports_progress_until_done(tmp_path, gate):
    with client_for(tmp_path) as client:
        job_id = submit(client, image_bytes(), method="gated", steps=4).json()["id"]
        threading.Timer(0.5, gate.open.set).start()  # the job waits at step 0 until the stream is open
        with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    states = [e["state"] for e in events]
    assert states[-1] == "done" and events[-1]["result"]["width"] == 64
    steps = [e["done"] for e in events if e["stage"] == "steps"]
    assert steps and steps[0] == 0 and steps == sorted(steps), steps
    fractions = [e["progress"] for e in events if e["state"] == "running" and e["stage"] == "steps"]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)


def test_models_stay_loaded_between_jobs(tmp_path, gate):
    gate.open.set()
    with client_for(tmp_path) as client:
        for variant in ("a", "a", "b", "a"):
            assert finished(client, submit(client, image_bytes(), method="gated", variant=variant, steps=1).json()["id"])["state"] == "done"
        assert client.get("/api/health").json()["models_loaded"] == 2
    assert gate.loads == 2, "one load per (method, load options)"


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, field",
    [
        ({"tiles": 4}, "tiles"),
        ({"tile": -1}, "tile"),
        ({"tile": 2.5}, "tile"),
        ({"outscale": 99}, "outscale"),
        ({"outscale": True}, "outscale"),
        ({"alpha_upsampler": "magic"}, "alpha_upsampler"),
        ({"model": "/etc/passwd"}, "model"),
        ({"model": "../models/tiny.pth"}, "model"),
        ({"device": "cuda"}, "device"),
        ({"method": "nope"}, "method"),
        ({"output_format": "gif"}, "output_format"),
    ],
)
def test_bad_options_answer_422_naming_the_field(tmp_path, model_dir, options, field):
    with client_for(tmp_path, model_dir=model_dir) as client:
        response = submit(client, image_bytes(), **options)
        assert field_of(response) == field
        assert field in response.json()["detail"][0]["msg"]


def test_options_that_are_not_a_json_object_answer_422(tmp_path):
    with client_for(tmp_path) as client:
        for text in ("{not json", "[1, 2]"):
            response = client.post("/api/jobs", files={"image": ("a.png", image_bytes())}, data={"options": text})
            assert field_of(response) == "options"


def test_a_missing_image_field_answers_422(tmp_path):
    with client_for(tmp_path) as client:
        response = client.post("/api/jobs", data={"options": "{}"})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "image"


def test_content_is_sniffed_and_bad_images_get_clear_4xx(tmp_path):
    png = image_bytes()
    with client_for(tmp_path) as client:
        text = submit(client, b"#!/bin/sh\necho not an image\n", name="evil.png")
        assert text.status_code == 415 and "not an image in a supported format" in text.json()["detail"]
        truncated = submit(client, png[: len(png) // 2], name="half.png")
        assert truncated.status_code == 400 and "half.png" in truncated.json()["detail"]
        folders = submit(client, b"", name="../../etc/passwd")
        assert folders.status_code == 400 and "passwd: empty file" in folders.json()["detail"]
        assert "/etc" not in folders.json()["detail"], "a client's path never reaches a message"


def test_pixel_and_upload_limits_answer_413(tmp_path):
    with client_for(tmp_path, max_pixels=500, max_upload_bytes=20_000) as client:
        many_pixels = submit(client, image_bytes(24, 32))
        assert many_pixels.status_code == 413 and "decompression bombs" in many_pixels.json()["detail"]
        big = client.post("/api/jobs", files={"image": ("big.png", b"\0" * 30_000)}, data={"options": "{}"})
        assert big.status_code == 413 and "--max-upload-mb" in big.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            for _ in range(40):
                yield b"x" * 1000

        streamed = client.post("/api/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert streamed.status_code == 413


# ---------------------------------------------------------------------- queue and failures


def test_a_full_queue_answers_503_with_retry_after_and_loses_no_job(tmp_path, gate):
    with client_for(tmp_path, workers=1, max_queue=2) as client:
        running = submit(client, image_bytes(), method="gated", steps=1).json()["id"]
        wait_for(gate.started.is_set)
        queued = [submit(client, image_bytes(), method="gated", steps=1) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        assert client.get(f"/api/jobs/{queued[1].json()['id']}").json()["queue_position"] == 2
        refused = submit(client, image_bytes(), method="gated", steps=1)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert submit(client, b"not an image").status_code == 503, "a full queue refuses before decoding"
        gate.open.set()
        ids = [running] + [r.json()["id"] for r in queued]
        assert [finished(client, i)["state"] for i in ids] == ["done"] * 3


def test_cancel_a_queued_and_a_running_job_and_the_worker_goes_on(tmp_path, gate):
    with client_for(tmp_path, workers=1) as client:
        running = submit(client, image_bytes(), method="gated", steps=20).json()["id"]
        wait_for(gate.started.is_set)
        queued = submit(client, image_bytes(), method="gated", steps=1).json()["id"]
        cancelled = client.delete(f"/api/jobs/{queued}").json()
        assert cancelled["state"] == "cancelled"
        asked = client.delete(f"/api/jobs/{running}").json()
        assert asked["state"] == "running" and asked["cancel_requested"] is True
        gate.open.set()
        status = finished(client, running)
        assert status["state"] == "cancelled" and status["done"] < 20
        assert client.get(f"/api/jobs/{running}/result").status_code == 409
        after = submit(client, image_bytes(), method="gated", steps=1).json()["id"]
        assert finished(client, after)["state"] == "done"


def test_a_crashing_job_fails_with_its_reason_and_the_server_keeps_serving(tmp_path, gate, model_dir):
    (model_dir / "broken.pth").write_bytes(b"this is not a checkpoint")
    gate.open.set()
    with client_for(tmp_path, model_dir=model_dir) as client:
        crashed = finished(client, submit(client, image_bytes(), method="gated", fail=True).json()["id"])
        assert crashed["state"] == "failed" and crashed["error"] == "RuntimeError: boom: the model crashed"
        broken = finished(client, submit(client, image_bytes(), model="broken.pth").json()["id"])
        assert broken["state"] == "failed" and "broken.pth" in broken["error"]
        result = client.get(f"/api/jobs/{broken['id']}/result")
        assert result.status_code == 409 and "failed" in result.json()["detail"]
        good = finished(client, submit(client, image_bytes(), model="tiny.pth").json()["id"])
        assert good["state"] == "done"


def test_results_expire_and_their_files_are_deleted(tmp_path, gate):
    gate.open.set()
    with client_for(tmp_path, result_ttl=1.5) as client:
        job_id = submit(client, image_bytes(), method="gated", steps=1).json()["id"]
        status = finished(client, job_id)
        assert status["expires"] == pytest.approx(status["finished"] + 1.5)
        job_dir = tmp_path / "work" / job_id
        assert (job_dir / "result.png").is_file()
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").status_code == 410, timeout=10)
        assert not job_dir.exists()
        assert client.get(f"/api/jobs/{job_id}/result").status_code == 410


def test_deleting_a_finished_job_removes_its_files(tmp_path, gate):
    gate.open.set()
    with client_for(tmp_path) as client:
        job_id = submit(client, image_bytes(), method="gated", steps=1).json()["id"]
        finished(client, job_id)
        assert client.delete(f"/api/jobs/{job_id}").status_code == 200
        assert not (tmp_path / "work" / job_id).exists()
        assert client.get(f"/api/jobs/{job_id}").status_code == 410
        assert client.get("/api/jobs/0123abc").status_code == 404


def test_shutdown_removes_the_temporary_work_folder(gate):
    gate.open.set()
    app = create_app(ServerConfig())
    with TestClient(app) as client:
        finished(client, submit(client, image_bytes(), method="gated", steps=1).json()["id"])
        work_dir = app.state.manager.work_dir
        assert any(work_dir.iterdir())
    assert not work_dir.exists()


# ------------------------------------------------------------------------------------ token


def test_a_token_guards_every_request(tmp_path):
    with client_for(tmp_path, token="s3cret") as client:
        for path in ("/", "/api/methods", "/openapi.json", "/static/app.js"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
        assert client.get("/api/methods", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/methods", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        opened = client.get("/?token=s3cret", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=strict" in opened.headers["set-cookie"]
        # the client keeps the cookie, as the page's browser does
        assert client.get("/api/methods").status_code == 200
        assert "<title>diffsr" in client.get("/").text


# -------------------------------------------------------------------------------------- CLI


def test_serve_command_is_registered_and_checks_its_model_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--workers", "--max-queue", "--token", "--model-dir", "--result-ttl"):
        assert flag in text
    assert main(["serve", "--model-dir", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_token_can_come_from_the_environment(monkeypatch):
    from diffsr.cli.main import build_parser

    monkeypatch.setenv("DIFFSR_SERVER_TOKEN", "from-env")
    assert build_parser(["serve"]).parse_args(["serve"]).token == "from-env"
    assert build_parser(["serve"]).parse_args(["serve", "--token", "given"]).token == "given"


def test_the_page_and_its_assets_are_served(tmp_path):
    with client_for(tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="compare"' in page.text
        for asset in ("/static/app.js", "/static/app.css"):
            assert client.get(asset).status_code == 200, asset
