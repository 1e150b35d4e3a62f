"""A Hydra sweep over methods, merged into one table and figure by ``python -m tta.report``."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sweep_then_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "-m", "tta.run", "-m", "method=source,tent,eta", f"hydra.sweep.dir={sweep}",
                    "progress=false", "data.corruptions=[gaussian_noise,snow]"],
                   check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "tta.report", str(sweep)], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    table = (sweep / "report.md").read_text()
    assert table.strip() == proc.stdout.split("\nwrote")[0].strip()
    assert (sweep / "report.png").stat().st_size > 1000
    accuracy = table.split("\n\n")[0].splitlines()  # the first table: runs x domains
    rows = {line.split("|")[1].strip(): line for line in accuracy[2:]}
    assert set(rows) == {"source", "tent", "eta"}
    assert accuracy[0] == "| run | gaussian_noise | snow | mean |"  # one seed: no seeds column
    mean = {name: float(line.split("|")[-2]) for name, line in rows.items()}
    assert mean["tent"] > mean["source"] + 15 and mean["eta"] > mean["source"] + 15
    # what the learning methods learned from: tent every sample, eta its selection
    learned = table.split("## what each method learned from")[1].splitlines()
    learned = {line.split("|")[1].strip(): line.split("|") for line in learned if line.startswith("| ") and "run" not in line}
    assert set(learned) == {"tent", "eta"}
    assert float(learned["tent"][2]) == 100.0 and 0 < float(learned["eta"][2]) < 100
    assert "entropy_margin" in learned["eta"][5] and "redundancy" in learned["eta"][5]
    assert (sweep / "selection.png").stat().st_size > 1000


@pytest.mark.slow
def test_sweep_through_the_submitit_launcher(tmp_path):
    """The launcher that runs sweeps on SLURM (``hydra/launcher=submitit_slurm``), run locally."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "-m", "tta.run", "-m", "hydra/launcher=submitit_local", "method=norm",
                    f"hydra.sweep.dir={sweep}", "progress=false", "data.corruptions=[fog]"],
                   check=True, capture_output=True, env=env, timeout=600)
    record = (sweep / "0" / "run.json").read_text()
    assert '"fog/5"' in record


def test_report_merges_run_records_of_a_sweep(tmp_path):
    """The merge alone, on two hand-written run records in a sweep's layout (``<sweep>/<job>/run.json``):
    one row per method with each domain's accuracy and the mean, the frozen source model first, and
    ``report.md`` and ``report.png`` written into the sweep folder."""
    import json

    from tta import report

    def record(method, accuracy, source):
        domains = {f"{name}/5": {"n": 100, "accuracy": a, "source_accuracy": s}
                   for name, a, s in zip(("gaussian_noise", "snow"), accuracy, source)}
        return {"status": "finished", "method": {"method": method}, "config": {"seed": 0},
                "results": {"mean": {"accuracy": sum(accuracy) / 2, "source_accuracy": sum(source) / 2},
                            "domains": domains}}

    sweep = tmp_path / "sweep"
    for job, (method, accuracy) in enumerate([("norm", (0.6, 0.7)), ("tent", (0.62, 0.74))]):
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "run.json").write_text(json.dumps(record(method, accuracy, (0.2, 0.3))))
    report.main([str(sweep)])
    table = (sweep / "report.md").read_text().split("\n\n")[0].splitlines()
    assert table[0] == "| run | gaussian_noise | snow | mean |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["source", "norm", "tent"]
    means = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table[2:]}
    assert means["source"].startswith("25.0") and means["norm"].startswith("65.0") and "68.0" in means["tent"]
    assert (sweep / "report.png").stat().st_size > 1000
