"""Sweeps: grid expansion, resuming after a kill, failed cells, and the report table."""

import json
import math
import subprocess
import sys

import pytest

from fedortho.config import ConfigError
from fedortho.report import report
from fedortho.sweep import Sweep, cell_status, load_sweep, run_sweep

GRID_TOML = """
[sweep]
name = "demo"
[base]
rounds = 2
clients = 3
clients-per-round = 3
[grid]
strategy = ["ffa", "fedsvd"]
epsilon = [6.0, inf]
seed = [0, 1, 2]
"""


def write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_sweeps_expand_into_valid_runs():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))
    assert {f.stem for f in files} >= {"privacy", "optimizers", "equivalence"}
    sizes = {f.stem: len(load_sweep(f).cells()) for f in files}
    assert sizes["privacy"] == 27  # 3 strategies x 3 epsilons x 3 seeds


def test_grid_expands_to_every_combination(tmp_path):
    sweep = load_sweep(write(tmp_path, GRID_TOML))
    cells = sweep.cells()
    assert len(cells) == 2 * 2 * 3
    assert len({c.name for c in cells}) == 12
    first = cells[0]
    assert first.name == "strategy-ffa_epsilon-6_seed-0"
    assert first.settings == {"rounds": 2, "clients": 3, "clients-per-round": 3, "strategy": "ffa",
                              "epsilon": 6.0, "seed": 0}
    assert any(c.values["epsilon"] == math.inf and c.name.endswith("epsilon-inf_seed-2") for c in cells)
    assert str(sweep.out).endswith("experiments/results/demo")


def test_a_grid_key_of_tables_sets_settings_together(tmp_path):
    sweep = load_sweep(write(tmp_path, """
[base]
rounds = 2
[grid]
privacy = [{label = "no-dp", epsilon = inf, lr = 0.5}, {label = "eps6", epsilon = 6.0, clip = 0.5, lr = 2.0}]
seed = [0, 1]
"""))
    sweep.out = tmp_path / "out"
    cells = sweep.cells()
    assert [c.name for c in cells] == ["privacy-no-dp_seed-0", "privacy-no-dp_seed-1", "privacy-eps6_seed-0",
                                       "privacy-eps6_seed-1"]
    assert cells[2].values == {"privacy": "eps6", "seed": 0}
    assert cells[2].settings == {"rounds": 2, "epsilon": 6.0, "clip": 0.5, "lr": 2.0, "seed": 0}
    assert cells[0].settings["epsilon"] == math.inf and "clip" not in cells[0].settings
    # The report's grouping (over seeds) and the grid check after a restart read the same cells.
    run_sweep(sweep, run_cell=fake_cell, echo=lambda line: None)
    assert "| eps6 | 2 |" in report(sweep.out, echo=lambda text: None)
    assert run_sweep(sweep, run_cell=fake_cell, echo=lambda line: None)["done-before"] == 4


@pytest.mark.parametrize("text,message", [
    ("[grid]\nstrategy = ['fedprox']\n", "strategy must be one of"),
    ("[grid]\n", "empty"),
    ("[base]\nseed = 1\n[grid]\nseed = [1, 2]\n", "both"),
    ("[grid]\nseed = 3\n", "non-empty list"),
    ("[grid\n", "cannot read"),
    ("[grids]\nseed = [1]\n", "unknown tables"),
    ("[grid]\nepsilon = [1, 1.0]\n", "same cell folder"),
    ("[sweep]\nnmae = 'x'\n[grid]\nseed = [1]\n", "unknown keys in \\[sweep\\]"),
    ("sweep = 'x'\n[grid]\nseed = [1]\n", "'sweep' must be a table"),
    ("base = 1\n[grid]\nseed = [1]\n", "'base' must be a table"),
    ("[grid]\nrule = [{strategy = 'ffa'}]\n", "needs its own label"),
    ("[grid]\nrule = [{label = 'a', strategy = 'ffa'}, 'fedsvd']\n", "mixes tables"),
    ("[base]\nlr = 1.0\n[grid]\nrule = [{label = 'a', lr = 2.0}]\n", "'lr' is set by grid key 'rule' and also"),
    ("[grid]\na = [{label = 'x', lr = 2.0}]\nb = [{label = 'y', lr = 1.0}]\n", "set by both grid keys"),
    ("[grid]\nrule = [{label = 'a', strategy = 'fedprox'}]\n", "strategy must be one of"),
    ("[grid]\nepsilon = [{label = 'a', clip = 1.0}]\n", "names a run setting"),
    ("[base]\ninit_a = 'kaiming'\n[grid]\nrule = [{label = 'a', init-a = 'orthonormal'}]\n", "also by \\[base\\]"),
    ("[grid]\nepsilon = [3.0, 1e309]\n", "1e309 is not a finite number \\(only the literal inf means infinity\\)"),
    ("[base]\nepsilon = nan\n[grid]\nseed = [1]\n", "nan is not a finite number"),
])
def test_bad_sweep_files_fail_before_any_cell_runs(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, text)).cells()


def fake_cell(cell, folder, accuracy=None):
    """What a finished `fedortho simulate` leaves: a run folder with summary and metrics."""
    run = folder / "run"
    run.mkdir()
    acc = accuracy if accuracy is not None else 0.5 + 0.01 * cell.values.get("seed", 0)
    eps = cell.settings.get("epsilon", 6.0)
    (run / "summary.json").write_text(json.dumps({
        "final-accuracy": acc, "best-accuracy": acc + 0.01, "epsilon-spent": "inf" if math.isinf(eps) else eps,
        "wall-seconds": 10.0 + cell.values.get("seed", 0), "completed": True}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"round": 0, "test-accuracy": 0.5, "test-loss": 0.7},
        {"round": 1, "test-accuracy": acc, "test-loss": 0.6, "epsilon": eps if math.isfinite(eps) else "inf"})))


def small_sweep(tmp_path):
    return Sweep(name="t", out=tmp_path / "out", base={"rounds": 1},
                 grid={"epsilon": [3.0, 6.0, math.inf], "seed": [0, 1]})


def test_a_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path):
    sweep = small_sweep(tmp_path)
    ran = []

    def killed_at_third(cell, folder):
        if len(ran) == 2:
            (folder / "run").mkdir()
            (folder / "run" / "metrics.jsonl").write_text('{"round": 0}\n')  # half-written
            raise KeyboardInterrupt
        fake_cell(cell, folder)
        ran.append(cell.name)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, run_cell=killed_at_third, echo=lambda _: None)
    done = [c.name for c in sweep.cells() if cell_status(sweep.out / c.name) == "done"]
    assert done == ran and len(done) == 2
    before = {name: (sweep.out / name / "run" / "summary.json").read_text() for name in done}

    rerun = []
    counts = run_sweep(sweep, run_cell=lambda cell, folder: (rerun.append(cell.name), fake_cell(cell, folder)),
                       echo=lambda _: None)
    assert counts == {"cells": 6, "done-before": 2, "ran": 4, "failed": 0}
    assert not set(rerun) & set(done)  # nothing finished ran again
    assert all((sweep.out / n / "run" / "summary.json").read_text() == before[n] for n in done)
    assert all(cell_status(sweep.out / c.name) == "done" for c in sweep.cells())
    assert run_sweep(sweep, run_cell=lambda *_: pytest.fail("ran a finished cell"),
                     echo=lambda _: None)["ran"] == 0


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path):
    sweep = small_sweep(tmp_path)

    def flaky(cell, folder):
        if cell.values["epsilon"] == 3.0 and cell.values["seed"] == 1:
            raise RuntimeError("fedortho: error: something broke")
        fake_cell(cell, folder)

    lines = []
    counts = run_sweep(sweep, parallel=2, run_cell=flaky, echo=lines.append)
    assert counts["failed"] == 1 and counts["ran"] == 5
    status = json.loads((sweep.out / "epsilon-3_seed-1" / "status.json").read_text())
    assert status == {"status": "failed", "error": "fedortho: error: something broke"}
    assert any("failed" in line for line in lines) and any("ETA" in line for line in lines)
    text = report(sweep.out, echo=lambda _: None)
    assert "- epsilon-3_seed-1: fedortho: error: something broke" in text


def test_a_damaged_status_file_does_not_lose_a_finished_cell(tmp_path):
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, run_cell=fake_cell, echo=lambda _: None)
    (sweep.out / "epsilon-3_seed-0" / "status.json").write_text('"done"')  # valid JSON, wrong layout
    (sweep.out / "epsilon-6_seed-1" / "status.json").write_text('{"stat')  # cut short
    counts = run_sweep(sweep, run_cell=lambda *_: pytest.fail("ran a finished cell"), echo=lambda _: None)
    assert counts["done-before"] == 6 and counts["ran"] == 0


def test_a_sweep_file_that_changed_under_finished_cells_is_refused(tmp_path):
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, run_cell=fake_cell, echo=lambda _: None)
    before = (sweep.out / "epsilon-3_seed-0" / "run" / "summary.json").read_text()
    changed = Sweep(name="t", out=sweep.out, base={"rounds": 2}, grid=sweep.grid)
    with pytest.raises(ConfigError, match="ran with rounds=1, the sweep file now gives rounds=2"):
        run_sweep(changed, run_cell=lambda *_: pytest.fail("ran a cell"), echo=lambda _: None)
    assert (sweep.out / "epsilon-3_seed-0" / "run" / "summary.json").read_text() == before
    # Settings written differently but meaning the same run are not a change.
    same = Sweep(name="t", out=sweep.out, base={"rounds": "1", "strategy": "fedsvd"}, grid=sweep.grid)
    assert run_sweep(same, run_cell=lambda *_: pytest.fail("ran a cell"), echo=lambda _: None)["ran"] == 0


def test_a_damaged_cell_is_left_out_of_the_report_with_its_reason(tmp_path):
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, run_cell=fake_cell, echo=lambda _: None)
    (sweep.out / "epsilon-3_seed-1" / "run" / "summary.json").write_text('{"final-accuracy": ')
    metrics = sweep.out / "epsilon-6_seed-0" / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "\n\n")  # blank lines are not damage
    # Two writers in one folder: rows 0, 1 of one run and 0, 1 of another, appended.
    mixed = sweep.out / "epsilon-inf_seed-0" / "run" / "metrics.jsonl"
    mixed.write_text(mixed.read_text() + "\n" + mixed.read_text())
    text = report(sweep.out, echo=lambda _: None)
    assert "| 3 | 1 | 0.5000 ± 0.0000 |" in text  # seed 0 only
    assert "| 6 | 2 |" in text
    assert "| inf | 1 |" in text  # seed 1 only
    assert "- epsilon-3_seed-1: JSONDecodeError" in text
    assert "- epsilon-inf_seed-0: ValueError: metrics.jsonl is not one row per round from 0 (rounds 0, 1, 0, 1)" in text


def test_cells_of_an_earlier_grid_are_kept_out_of_the_report(tmp_path):
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, run_cell=fake_cell, echo=lambda _: None)
    # The grid gains a key: every cell name changes, and the old cells stay in the folder.
    wider = Sweep(name="t", out=sweep.out, base={"rounds": 2}, grid={**sweep.grid, "local-steps": [3]})
    run_sweep(wider, run_cell=lambda c, f: fake_cell(c, f, accuracy=0.9), echo=lambda _: None)
    text = report(sweep.out, echo=lambda _: None)
    assert text.count("| 0.9000 ± 0.0000 |") == 3 and "0.5000" not in text
    assert "Left out, not in the sweep's current grid: 6 cells (epsilon-3_seed-0, epsilon-3_seed-1, epsilon-6_seed-0, ...)" in text


def test_dry_run_names_the_cells_whose_settings_changed(tmp_path):
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, run_cell=fake_cell, echo=lambda _: None)
    path = write(tmp_path, f"""
[sweep]
name = "t"
out = "{sweep.out}"
[base]
rounds = 3
[grid]
epsilon = [3.0, 6.0, inf]
seed = [0, 1, 2]
""")
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "sweep", str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "  changed epsilon-3_seed-0  (ran with rounds=1, the sweep file now gives rounds=3)" in lines
    assert "  todo    epsilon-3_seed-2" in lines
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "sweep", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("fedortho: error: 6 finished cells")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_gives_the_expected_table(tmp_path):
    sweep = small_sweep(tmp_path)
    accuracy = {("3", 0): 0.60, ("3", 1): 0.64, ("6", 0): 0.70, ("6", 1): 0.70, ("inf", 0): 0.80, ("inf", 1): 0.90}

    def cell(c, folder):
        eps = "inf" if math.isinf(c.values["epsilon"]) else f"{c.values['epsilon']:g}"
        fake_cell(c, folder, accuracy[(eps, c.values["seed"])])

    run_sweep(sweep, run_cell=cell, echo=lambda _: None)
    text = report(sweep.out, echo=lambda _: None)
    assert text == (
        "| epsilon | seeds | final accuracy | best accuracy | epsilon spent | wall time (s) |\n"
        "|---|---|---|---|---|---|\n"
        "| 3 | 2 | 0.6200 ± 0.0283 | 0.6300 ± 0.0283 | 3.00 ± 0.00 | 10 ± 1 |\n"
        "| 6 | 2 | 0.7000 ± 0.0000 | 0.7100 ± 0.0000 | 6.00 ± 0.00 | 10 ± 1 |\n"
        "| inf | 2 | 0.8500 ± 0.0707 | 0.8600 ± 0.0707 | inf | 10 ± 1 |\n")
    csv_lines = (sweep.out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epsilon,seeds,final accuracy") and len(csv_lines) == 4
    for name in ("accuracy_vs_epsilon.png", "accuracy_vs_round.png", "epsilon_vs_round.png"):
        assert (sweep.out / name).stat().st_size > 1000


def test_a_budget_set_by_a_bundle_gets_its_accuracy_plot_only_when_labels_and_budgets_correspond(tmp_path):
    """A user-level sweep names its budgets by labels (user-privacy = user-eps2, ...): the plot
    of accuracy against user epsilon reads the budget from the cells' settings, draws one line
    per strategy, and is left out for a bundle that varies another setting at one budget."""
    from fedortho.report import _population_note, budget_axis, load_cells

    inf = math.inf
    privacy = [{"label": "u2", "user-epsilon": 2.0}, {"label": "u8", "user-epsilon": 8.0},
               {"label": "none", "user-epsilon": inf}]
    sweep = Sweep(name="u", out=tmp_path / "u", base={"rounds": 1, "epsilon": inf},
                  grid={"user-privacy": privacy, "strategy": ["ffa", "fedsvd"], "seed": [0]})

    def user_cell(cell, folder):  # the clip moves each round; the last round records none
        fake_cell(cell, folder)
        metrics = folder / "run" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        if math.isfinite(cell.settings["user-epsilon"]):
            rows[0]["update-clip"], rows[1]["update-clip"] = 0.1, 0.25
            rows.append({"round": 2, "test-accuracy": 0.6})
        metrics.write_text("\n".join(json.dumps(r) for r in rows))

    run_sweep(sweep, run_cell=user_cell, echo=lambda _: None)
    groups = load_cells(sweep.out).groups
    at, legend = budget_axis(groups, "user-epsilon")
    assert legend == ["strategy"]
    assert sorted(at.values()) == [2.0, 2.0, 8.0, 8.0, inf, inf]
    assert all(at[i] == {"u2": 2.0, "u8": 8.0, "none": inf}[g.values["user-privacy"]] for i, g in enumerate(groups))
    assert budget_axis(groups, "epsilon") is None  # one record-level budget for all
    assert _population_note(groups, "user-epsilon") == ""  # real clients: no note on the axis
    for g in groups:
        g.settings["noise-cohort-size"] = 1000
    assert _population_note(groups, "user-epsilon") == " (noise sized for cohorts of 1000: a simulated population)"
    text = report(sweep.out, echo=lambda _: None)
    assert text.splitlines()[0].endswith("| last update clip |")
    assert text.count("| 0.250 ± 0.000 |") == 4 and text.count("| – |") == 2  # no clip without user DP
    assert (sweep.out / "accuracy_vs_user_epsilon.png").stat().st_size > 1000
    assert not (sweep.out / "accuracy_vs_epsilon.png").exists()

    clips = [{"label": "c2", "user-epsilon": 2.0, "update-clip": 2.0},
             {"label": "c1", "user-epsilon": 2.0, "update-clip": 1.0}, {"label": "none", "user-epsilon": inf}]
    mixed = Sweep(name="m", out=tmp_path / "m", base={"rounds": 1},
                  grid={"user-privacy": clips, "strategy": ["ffa"], "seed": [0]})
    run_sweep(mixed, run_cell=fake_cell, echo=lambda _: None)
    assert budget_axis(load_cells(mixed.out).groups, "user-epsilon") is None


@pytest.mark.slow
def test_many_groups_are_plotted_in_one_panel_per_value_of_the_first_varying_key():
    from fedortho.report import Group, _panels

    groups = [Group({"seed": 0, "privacy": p, "rule": r}) for p in ("a", "b", "c") for r in ("x", "y", "z")]
    panels = _panels(groups)
    assert [title for title, _, _ in panels] == ["privacy=a", "privacy=b", "privacy=c"]
    assert all(len(members) == 3 and "privacy" not in shown for _, members, shown in panels)
    assert _panels(groups[:3]) == [("", groups[:3], ["seed", "privacy", "rule"])]  # few lines: one panel


def test_every_line_of_a_crowded_plot_has_its_own_look():
    """Eleven optimizer runs on one axis: matplotlib's ten colours alone would draw the
    eleventh like the first."""
    from fedortho.report import _line_style

    looks = [tuple(sorted(_line_style(i).items())) for i in range(30)]
    assert len(set(looks)) == 30


def test_a_cell_still_being_written_is_neither_deleted_nor_rerun(tmp_path):
    """The child of a killed sweep may still write its cell: a restarted sweep leaves that
    folder alone and says why."""
    import fcntl

    sweep = small_sweep(tmp_path)
    busy = sweep.out / "epsilon-3_seed-0" / "run"
    busy.mkdir(parents=True)
    (busy / "metrics.jsonl").write_text('{"round": 0}\n')
    messages = []
    with open(busy / ".lock", "a") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        counts = run_sweep(sweep, run_cell=fake_cell, echo=messages.append)
    assert counts["failed"] == 1 and counts["ran"] == 5
    assert (busy / "metrics.jsonl").read_text() == '{"round": 0}\n'  # untouched
    assert any("epsilon-3_seed-0 failed: cell epsilon-3_seed-0: its run folder is still being written" in m
               for m in messages)


def test_a_dry_run_whose_reader_goes_away_ends_quietly(tmp_path):
    """`fedortho sweep F --dry-run | head`: more lines than a pipe holds, read one, close."""
    seeds = ", ".join(str(s) for s in range(3000))
    path = write(tmp_path, f'[sweep]\nname = "long"\n[base]\nrounds = 1\n[grid]\nseed = [{seeds}]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedortho.cli", "sweep", str(path), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"sweep long: 3000 cells")
    proc.stdout.close()
    errors = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert errors == ""
