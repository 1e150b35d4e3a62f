"""Resumable runs and run folders that are never overwritten silently.

A real ``python -m tta.run`` is killed with SIGKILL after its first checkpoint and continued with
``resume=true``: its run.json equals an uninterrupted run's. The engine resumes exactly from any
checkpoint (every N batches, or a domain end); finished, unfinished and failed run folders are
handled as the command line documents, and ``tta.report`` lists the runs that did not finish.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tta
from tta.data import load_data_config
from tta.models import load_classifier

CHECKPOINT_NAME = "checkpoint.pt"
RUN = ["data.corruptions=[shot_noise,fog]", "max_samples=1000", "batch_size=16", "checkpoint_every=5",
       "method=deyo"]  # DeYO: its patch shuffles draw from the global RNG, so the RNG states must be restored too


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tta.run import register_configs

    register_configs()
    with initialize_config_dir(str(Path(tta.__file__).parent / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=["progress=false", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def execute(out, *overrides):
    from tta.run import execute as run_execute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same kernels, the same numbers
    try:
        return run_execute(compose(*overrides), out)
    finally:
        torch.set_num_threads(threads)


def same_run(a, b):
    assert a["results"] == b["results"]
    assert a["counts"] == b["counts"]
    assert a["stream"]["order_hash"] == b["stream"]["order_hash"]
    assert a.get("selection") == b.get("selection")


@pytest.mark.slow
def test_killed_run_resumes_to_the_results_of_an_uninterrupted_run(tmp_path):
    import threading

    from tta.checkpoint import load_checkpoint

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tta.run", f"hydra.run.dir={folder}", "progress=false", *RUN]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = {}

    def kill_after_first_checkpoint():  # a watcher, while this process runs the uninterrupted run
        deadline = time.time() + 300
        while not (folder / CHECKPOINT_NAME).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # written atomically: it exists only once complete
        killed["alive"] = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    uninterrupted = execute(tmp_path / "whole", *RUN)
    watcher.join()
    assert killed["alive"], proc.stderr.read().decode()[-3000:]
    assert not (folder / "run.json").exists()
    done = load_checkpoint(folder / CHECKPOINT_NAME)["progress"]["done"]
    assert 0 < done < 63  # killed mid-run (63 batches in all)

    execute(folder, *RUN, "resume=true")  # the same command with resume=true (in this process: no second start-up)
    record = json.loads((folder / "run.json").read_text())
    same_run(record, uninterrupted)
    assert record["status"] == "finished"
    assert record["checkpoints"]["resumed"][0]["batches_done"] == done
    assert record["counts"]["counters"]["batches"] == 63
    assert not (folder / CHECKPOINT_NAME).exists()  # removed once run.json is written


def test_engine_resumes_exactly_from_every_kind_of_checkpoint():
    """From a checkpoint taken every N batches and from one taken at a domain end."""
    from tta.checkpoint import changing_state, restore_method, rng_state, set_rng_state
    from tta.data import benchmarks

    config = dict(load_data_config("digits_c"), corruptions=["gaussian_noise", "fog", "pixelate"])
    saves = []
    method = tta.methods.build("deyo", load_classifier("digits_cnn"))

    def keep(progress):
        saves.append((progress, changing_state(method), rng_state()))

    from tta import engine

    def stream():
        return benchmarks.build_stream(config, severity=5, seed=2, batch_size=48, max_samples=1000)

    torch.manual_seed(0)
    s, options = stream()
    whole = engine.run(method, s, progress=False, checkpoint=keep, checkpoint_every=7, **options)
    done = [p["done"] for p, _, _ in saves]
    # 719 gaussian_noise (15 batches) + 281 fog (6 batches): every 7 batches and both domain ends
    assert done == [7, 14, 15, 21], done
    for progress, state, rng in (saves[1], saves[2]):  # mid-domain, and the end of gaussian_noise
        fresh = tta.methods.build("deyo", load_classifier("digits_cnn"))
        restore_method(fresh, state)
        set_rng_state(rng)
        s, options = stream()
        again = engine.run(fresh, s, progress=False, resume=progress, **options)
        assert again["results"] == whole["results"]
        assert again["stats"] == whole["stats"]
        assert again["order_hash"] == whole["order_hash"]
        assert again["selection"] == whole["selection"]


def test_order_hash_resumes():
    from tta.checkpoint import OrderHash

    ids = [torch.arange(i, i + 4) for i in range(0, 40, 4)]
    whole = OrderHash()
    for i, x in enumerate(ids):
        whole.update("a" if i < 5 else "b", x)
    part = OrderHash()
    for i, x in enumerate(ids[:3]):
        part.update("a", x)
    cont = OrderHash()
    cont.load_state_dict(part.state_dict())
    for i, x in enumerate(ids[3:], start=3):
        cont.update("a" if i < 5 else "b", x)
    assert cont.hexdigest() == whole.hexdigest()
    other = OrderHash()
    for i, x in enumerate(ids):
        other.update("a" if i < 6 else "b", x)  # the same ids, another domain cut
    assert other.hexdigest() != whole.hexdigest()


SMALL = ["method=tent", "data.corruptions=[fog]", "max_samples=100", "batch_size=50"]


def test_run_folders_are_never_overwritten_silently(tmp_path):
    from tta.run import RunFolderError, _precheck

    folder = tmp_path / "run"
    first = execute(folder, *SMALL)
    assert first["status"] == "finished" and first["checkpoints"]["written"] == 1
    hydra_files = folder / ".hydra"
    with pytest.raises(RunFolderError, match="holds a finished run"):
        execute(folder, *SMALL)
    before = (folder / "run.json").read_text()
    again = execute(folder, *SMALL, "resume=true")  # a finished run has nothing to resume: left as it is
    assert again["results"] == first["results"] and again["status"] == "finished"
    assert (folder / "run.json").read_text() == before
    with pytest.raises(SystemExit, match="holds a finished run"):  # before Hydra writes .hydra/ into the folder
        _precheck([f"hydra.run.dir={folder}", "seed=3"])
    assert not hydra_files.exists()
    _precheck([f"hydra.run.dir={folder}", "overwrite=true"])
    second = execute(folder, *SMALL, "seed=1", "overwrite=true")
    assert json.loads((folder / "run.json").read_text())["config"]["seed"] == 1 != first["config"]["seed"]
    assert second["status"] == "finished"

    # an unfinished run (a checkpoint, no run.json): continue it or start over, never silently
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    torch.save({"format": "tta.run checkpoint"}, unfinished / CHECKPOINT_NAME)
    with pytest.raises(RunFolderError, match="resume=true to continue"):
        execute(unfinished, *SMALL)
    execute(unfinished, *SMALL, "overwrite=true")
    assert not (unfinished / CHECKPOINT_NAME).exists()


def test_resume_with_another_command_is_refused(tmp_path):
    folder = tmp_path / "run"
    saves = []
    from tta import checkpoint as ckpt

    original = ckpt.Checkpointer.__call__

    def stop_after_first(self, progress):
        original(self, progress)
        saves.append(progress["done"])
        raise KeyboardInterrupt  # as if killed right after the first checkpoint

    ckpt.Checkpointer.__call__ = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(folder, *SMALL, "max_samples=300", "checkpoint_every=2")
    finally:
        ckpt.Checkpointer.__call__ = original
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "KeyboardInterrupt"
    assert record["checkpoint_left"] and saves == [2]
    with pytest.raises(ValueError, match="another configuration.*seed"):
        execute(folder, *SMALL, "max_samples=300", "checkpoint_every=2", "seed=9", "resume=true")
    resumed = execute(folder, *SMALL, "max_samples=300", "checkpoint_every=3", "resume=true")  # every N may change
    whole = execute(tmp_path / "whole", *SMALL, "max_samples=300")
    same_run(resumed, whole)
    assert resumed["checkpoints"]["resumed"][0]["batches_done"] == 2


def test_report_lists_failed_and_incomplete_runs(tmp_path):
    from tta.report import main as report

    sweep = tmp_path / "sweep"
    execute(sweep / "0", *SMALL)
    with pytest.raises(ValueError):
        execute(sweep / "1", *SMALL, "method.lr=abc")
    (sweep / "2" / ".hydra").mkdir(parents=True)  # killed before its first checkpoint
    (sweep / "3" / ".hydra").mkdir(parents=True)
    torch.save({}, sweep / "3" / CHECKPOINT_NAME)
    report([str(sweep)])
    text = (sweep / "report.md").read_text()
    assert "runs that did not finish (3" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith(f"| {sweep}")}
    assert "failed" in lines[str(sweep / "1")] and "method.lr must be a number" in lines[str(sweep / "1")]
    assert "incomplete" in lines[str(sweep / "2")] and "no run.json" in lines[str(sweep / "2")]
    assert "resume=true" in lines[str(sweep / "3")]
    assert str(sweep / "0") not in lines
    only_bad = tmp_path / "bad"
    (only_bad / "x" / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit, match="(?s)no finished run.json.*incomplete"):
        report([str(only_bad)])
