"""``tta.report`` over a sweep with several seeds: mean ± std per cell, the number of seeds, and marks
for differences smaller than the spread."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tta import report
from tta.aggregate import Stat, group_cells, marks, within_spread

DOMAINS = ("gaussian_noise/5", "fog/5")


def fake_record(method: str, seed: int, accs: tuple[float, float], *, model: str = "digits_cnn",
                setting: str = "reset_each_shift", kept: float | None = None, precision: float | None = None) -> dict:
    domains = {d: {"n": 100, "accuracy": a, "source_accuracy": 0.2} for d, a in zip(DOMAINS, accs)}
    record = {
        "config": {"method": {"name": method, "lr": None}, "policies": {"extra": []}, "seed": seed,
                   "setting": {"name": setting, "reset_each_domain": True}, "model": None, "progress": False},
        "method": {"method": method},
        "model": {"spec": model},
        "results": {"mean": {"accuracy": sum(accs) / 2, "source_accuracy": 0.2}, "domains": domains},
        "selection": None,
    }
    if kept is not None:
        learned = {"n": 200, "kept_frac": kept, "precision": precision, "dropped_accuracy": 0.5}
        record["selection"] = {"stages": ["entropy_margin"], "learned_from": "entropy_margin",
                               "policies": {"entropy_margin": {"domains": {}, "mean": learned}},
                               "learned": {"domains": {}, "mean": learned}, "warnings": []}
    return record


# three seeds of three methods: tent clearly above norm; eta within tent's spread
TENT = [(0.70, 0.50), (0.74, 0.52), (0.72, 0.60)]
NORM = [(0.60, 0.40), (0.61, 0.41), (0.62, 0.42)]
ETA = [(0.71, 0.50), (0.70, 0.55), (0.73, 0.50)]


def write_sweep(root: Path) -> Path:
    job = 0
    for method, accs in (("norm", NORM), ("tent", TENT), ("eta", ETA)):
        for seed, acc in enumerate(accs, start=1):
            kept = {"norm": None, "tent": 1.0, "eta": 0.1 * seed}[method]
            folder = root / str(job)
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps(fake_record(method, seed, acc, kept=kept, precision=0.9)))
            job += 1
    return root


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values)


def test_seeds_make_one_cell_with_mean_and_sample_std(tmp_path):
    records = [json.loads(p.read_text()) for p in report.find_runs([write_sweep(tmp_path / "sweep")])]
    cells, keys = group_cells(records)
    assert keys == [] and [c.label for c in cells] == ["norm", "tent", "eta"]
    tent = cells[1]
    assert tent.seeds == [1, 2, 3]
    mean, std = mean_std([(a + b) / 2 for a, b in TENT])
    stat = tent.metric("accuracy")
    assert stat.n == 3 and stat.mean == pytest.approx(mean) and stat.std == pytest.approx(std)
    fog = tent.metric("accuracy", "fog/5")
    assert (fog.mean, fog.std) == pytest.approx(mean_std([b for _, b in TENT]))
    kept = cells[2].selection("kept_frac")
    assert (kept.mean, kept.std) == pytest.approx(mean_std([0.1, 0.2, 0.3]))


def test_report_table_gives_mean_std_seeds_and_marks(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    report.main([str(sweep)])
    text = (sweep / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| run | gaussian_noise | fog | mean | seeds |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:6]}
    mean, std = mean_std([(a + b) / 2 for a, b in TENT])
    assert rows["tent"][2] == f"**{100 * mean:.1f} ± {100 * std:.1f}**" and rows["tent"][3] == "3"
    eta_mean, eta_std = mean_std([(a + b) / 2 for a, b in ETA])
    assert abs(eta_mean - mean) <= max(std, eta_std)  # the fake data is built so that eta ties with tent
    assert rows["eta"][2] == f"{100 * eta_mean:.1f} ± {100 * eta_std:.1f} ≈"
    norm_mean, norm_std = mean_std([(a + b) / 2 for a, b in NORM])
    assert rows["norm"][2] == f"{100 * norm_mean:.1f} ± {100 * norm_std:.1f}"  # clearly below: no mark
    assert "sample standard deviation" in text
    # what each method learned from, with seeds
    selection = text.split("## what each method learned from")[1]
    assert "| eta | 20.0 ± 10.0 | 90.0 ± 0.0 |" in selection and "| tent | 100.0 ± 0.0 |" in selection
    assert "norm" not in selection
    assert (sweep / "report.png").stat().st_size > 1000 and (sweep / "selection.png").stat().st_size > 1000


def test_pivot_matrix_over_settings_and_models(tmp_path):
    root = tmp_path / "sweep"
    job = 0
    for model in ("digits_cnn", "digits_gn"):
        for setting in ("continual", "bs1"):
            for method, accs in (("tent", TENT), ("norm", NORM)):
                for seed, acc in enumerate(accs):
                    folder = root / str(job)
                    folder.mkdir(parents=True)
                    record = fake_record(method, seed, acc, model=model, setting=setting,
                                         kept=1.0 if method == "tent" else None, precision=0.8)
                    record["config"]["data"] = {"subset": 100 if setting == "bs1" else None}  # fixed by the column
                    (folder / "run.json").write_text(json.dumps(record))
                    job += 1
    records = [json.loads(p.read_text()) for p in report.find_runs([root])]
    table = report.pivot_table(records, ["setting"])
    lines = table.splitlines()
    assert lines[0] == "| run | continual | bs1 |"
    labels = [line.split("|")[1].strip() for line in lines[2:8]]
    assert labels == ["source (frozen) · model=digits_cnn", "tent · model=digits_cnn", "norm · model=digits_cnn",
                      "source (frozen) · model=digits_gn", "tent · model=digits_gn", "norm · model=digits_gn"]
    assert lines[2].split("|")[2].strip() == "20.0 ± 0.0"
    mean, std = mean_std([(a + b) / 2 for a, b in TENT])
    assert lines[3].split("|")[2].strip() == f"**{100 * mean:.1f} ± {100 * std:.1f}** · 100/80"
    assert "set per column: data.subset=100 for bs1" in table
    with pytest.raises(ValueError, match="do not vary"):
        report.pivot_table(records, ["severity"])


def test_within_spread_and_marks():
    a, b = Stat(0.70, 0.02, 3), Stat(0.68, 0.01, 3)
    assert within_spread(a, b) and not within_spread(a, Stat(0.60, 0.02, 3))
    assert not within_spread(a, Stat(0.70, None, 1))  # no spread, no claim
    assert marks([a, b, Stat(0.5, 0.01, 3)]) == ["best", "tie", ""]
    assert marks([Stat(0.3, 0.01, 3), Stat(0.1, 0.05, 3)], higher_is_better=False) == ["", "best"]


def test_pivot_columns_with_a_stream_rate_pass(tmp_path):
    """The matrix's stream-rate column: the same setting under eval.stream_rate=1 is its own column,
    titled ``reset_each_shift · stream_rate=1``; the offline column keeps the plain setting name."""
    root = tmp_path / "sweep"
    job = 0
    for eta in (0, 1):
        for method, accs in (("tent", TENT), ("norm", NORM)):
            for seed, acc in enumerate(accs):
                folder = root / str(job)
                folder.mkdir(parents=True)
                record = fake_record(method, seed, acc, kept=1.0 if method == "tent" else None, precision=0.8)
                record["config"]["eval"] = {"stream_rate": eta}
                (folder / "run.json").write_text(json.dumps(record))
                job += 1
    records = [json.loads(p.read_text()) for p in report.find_runs([root])]
    lines = report.pivot_table(records, ["eval.stream_rate"]).splitlines()
    assert lines[0] == "| run | 0 | 1 |"  # a single key: its values as they are
    assert report._column_title(["setting", "eval.stream_rate"], ("reset_each_shift", "1")) \
        == "reset_each_shift · stream_rate=1"
    assert report._column_title(["setting", "eval.stream_rate"], ("continual", "0")) == "continual"
    assert report._column_title(["setting", "eval.stream_rate"], ("continual", "None")) == "continual"


def test_cli_names_the_keys_when_a_pivot_key_does_not_vary(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    with pytest.raises(SystemExit, match=r"pivot keys \['severity'\] do not vary"):
        report.main([str(sweep), "--pivot", "severity"])


def test_logging_and_other_settings_options_do_not_split_a_configuration():
    """Runs that differ only in how they were observed (a logger, its cadence, checkpoints) or in the
    options of a setting they did not use (ccc.*) are one configuration: their seeds form one cell."""
    records = []
    for seed, accs in enumerate(TENT):
        record = fake_record("tent", seed, accs)
        if seed:  # a later run: a logger attached, the ccc group in its config
            record["config"].update(logger=["tensorboard"], log_every=5, checkpoint_every=10,
                                    ccc={"difficulty": "medium"})
            record["config"]["data"] = {"ccc": {"speed": 50}}  # a data config's ccc block
        records.append(record)
    cells, keys = group_cells(records)
    assert len(cells) == 1 and cells[0].seeds == [0, 1, 2] and keys == []
    ccc = [fake_record("tent", seed, accs, setting="ccc") for seed, accs in enumerate(TENT)]
    ccc[0]["config"]["ccc"] = {"difficulty": "hard"}
    for record in ccc[1:]:
        record["config"]["ccc"] = {"difficulty": "medium"}
    cells, keys = group_cells(ccc)
    assert len(cells) == 2 and "ccc.difficulty" in keys  # where it shapes the stream, it splits
