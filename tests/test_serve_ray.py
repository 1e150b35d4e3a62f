"""The Ray Serve recipe (tta/serve/ray_serve.py) on the loopback interface: single-image requests
from several clients are batched and adapted on, the answers are right, the counters and the
Prometheus text show the adaptation, a malformed request gets a clear 400 and changes nothing, and a
restarted deployment resumes from the saved state. One Ray session for the module (num_cpus=1)."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
import torch

ray = pytest.importorskip("ray", reason="the serving recipe needs ray[serve] (pip install \"tta-toolkit[serve]\")")
pytest.importorskip("ray.serve", reason="the serving recipe needs ray[serve] (pip install \"tta-toolkit[serve]\")")

from tta.serve.ray_serve import STATE_NAME, BadRequest, parse_image  # noqa: E402

CLIENTS, PER_CLIENT = 4, 6  # 24 single-image requests


def test_parse_image_refuses_what_the_model_cannot_take():
    good = torch.rand(3, 32, 32)
    assert torch.equal(parse_image({"image": good.tolist()}, 3, (32, 32)), good)
    for payload, message in [([1, 2], "JSON object"), ({"img": 1}, "JSON object"),
                             ({"image": "abc"}, "nested list of numbers"),
                             ({"image": [[1.0, 0.0]]}, "3 dimensions"),
                             ({"image": torch.rand(1, 32, 32).tolist()}, "expected 3 channels"),
                             ({"image": torch.rand(3, 16, 16).tolist()}, "32 x 32"),
                             ({"image": (good + 1).tolist()}, r"in \[0, 1\]")]:
        with pytest.raises(BadRequest, match=message):
            parse_image(payload, 3, (32, 32))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        # Serve kills an HTTP proxy that is not ready within 5 s (its default), which a loaded 2-core
        # machine can exceed while Ray starts: give the proxy a minute (inherited by Ray's processes)
        for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
            env.setenv(name, "60")
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
    _no_ray_process_left()


def _no_ray_process_left() -> None:
    """After the shutdown no process Ray started from this one (raylet, GCS, workers) is left (``ps``)."""
    import os
    import time

    for _ in range(50):
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True,
                             text=True).stdout
        left = [line for line in out.splitlines() if "ray" in line and " ps " not in line]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"Ray processes left after shutdown: {left}")


def _deploy(state_dir):
    from ray import serve

    from tta.serve.ray_serve import app

    serve.run(app("digits_gn", "tent", state_dir=str(state_dir), save_every=2, max_batch_size=8,
                  batch_wait_timeout_s=0.2), name="tta", route_prefix="/")


def _post(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


def _metrics(base):
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(_get(f"{base}/metrics")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _checksum(state: dict) -> float:
    import tta

    local = tta.adapt("digits_gn", "tent", guard="reset_on_collapse")
    local.load_state_dict(state)
    return float(sum(p.detach().double().abs().sum() for p in local.adapted_parameters()))


@pytest.mark.slow
def test_batched_adaptation_metrics_bad_requests_and_restart(served, tmp_path):
    from ray import serve

    from tta.data.digits import load_digits_split

    base = served
    images, labels = load_digits_split("test")
    _deploy(tmp_path)
    answers: dict[int, dict] = {}

    def client(k: int) -> None:
        for j in range(PER_CLIENT):
            i = k * PER_CLIENT + j
            status, body = _post(f"{base}/", json.dumps({"image": images[i].tolist()}).encode())
            assert status == 200, body
            answers[i] = body

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = CLIENTS * PER_CLIENT
    assert sorted(answers) == list(range(n))
    for i, body in answers.items():  # each request gets its own image's answer
        assert len(body["logits"]) == 10 and body["class"] == int(torch.tensor(body["logits"]).argmax())
    correct = sum(body["class"] == int(labels[i]) for i, body in answers.items())
    assert correct >= 0.8 * n, correct  # clean digits: the GroupNorm model is right on most

    stats = json.loads(_get(f"{base}/stats"))
    counters = stats["counters"]
    assert counters["samples"] == n and counters["steps"] >= 1 and counters["kept"] > 0  # it adapted
    assert counters["batches"] < n  # requests were batched
    assert "guard_resets" in counters and stats["saves"] >= 1 and not stats["restored"]
    metrics = _metrics(base)
    assert metrics[("tta_samples_seen_total", ())] == n
    assert metrics[("tta_batches_total", ())] == counters["batches"]
    assert metrics[("tta_updates_applied_total", ())] == counters["steps"]
    assert metrics[("tta_step_latency_seconds_count", ())] == counters["batches"]
    assert metrics[("tta_last_checkpoint_timestamp_seconds", ())] > 0

    # malformed requests: a clear 400, nothing changes (counters, weights, the saved state)
    saved_bytes = (tmp_path / STATE_NAME).read_bytes()
    for body, message in [(b"not json", "not JSON"), (b'{"image": "abc"}', "nested list of numbers"),
                          (json.dumps({"image": torch.rand(1, 32, 32).tolist()}).encode(), "expected 3 channels"),
                          (json.dumps({"image": (images[0] + 2).tolist()}).encode(), r"[0, 1]")]:
        status, answer = _post(f"{base}/", body)
        assert status == 400 and message in answer["error"], answer
    after = json.loads(_get(f"{base}/stats"))
    assert after["counters"] == counters and after["adapted_checksum"] == stats["adapted_checksum"]
    assert (tmp_path / STATE_NAME).read_bytes() == saved_bytes

    # restart: a new deployment resumes from the saved state (weights-only load)
    saved = torch.load(tmp_path / STATE_NAME, weights_only=True)
    serve.delete("tta")
    _deploy(tmp_path)
    resumed = json.loads(_get(f"{base}/stats"))
    assert resumed["restored"]
    assert resumed["counters"]["samples"] == int(saved["counters.samples"]) > 0
    assert resumed["counters"]["batches"] == int(saved["counters.batches"])
    assert resumed["adapted_checksum"] == pytest.approx(_checksum(saved), rel=1e-12)
    assert _metrics(base)[("tta_samples_seen_total", ())] == int(saved["counters.samples"])
    status, body = _post(f"{base}/", json.dumps({"image": images[n].tolist()}).encode())
    assert status == 200
    assert json.loads(_get(f"{base}/stats"))["counters"]["samples"] == int(saved["counters.samples"]) + 1
    serve.delete("tta")

