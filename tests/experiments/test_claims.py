"""The papers'-claims table: the verdict rules on hand-made summaries, the rows, the README
section rewritten between its markers, and every claim naming arms its experiment file has."""

import json

import gin
import pytest

from moetx.experiments import claims, experiment
from moetx.util import gin_files


def stats(mean, spread=0.0):
    return {"mean": mean, "spread": spread, "values": [mean - spread, mean + spread]}


def axis(*per_seed):
    values = dict(enumerate(per_seed))
    reached = [v for v in per_seed if v is not None]
    mean = sum(reached) / len(reached) if len(reached) == len(per_seed) else None
    return {"per_seed": values, "mean": mean, "reached": f"{len(reached)}/{len(per_seed)}",
            "of_mean_curves": mean}


def arm(loss, spread=0.0, flops=None, seconds=None, failures=None, spikes=(0, 0, 0),
        dropped=None):
    return {"budget": 4e12, "steps": 130, "final_eval_loss": stats(loss, spread),
            "failures": failures or {},
            "loss_spikes": {str(i): n for i, n in enumerate(spikes)},
            "speedup": None if flops is None else {"flops": flops, "seconds": seconds or flops,
                                                   "steps": flops},
            "train_fraction_dropped": dropped, "eval_fraction_dropped": dropped}


@pytest.mark.parametrize("per_seed, verdict", [
    ((3.2, 3.5, 4.0), claims.REPRODUCED),
    ((1.4, 1.9, 1.6), claims.SMALLER),
    ((1.4, 0.9, 1.6), claims.NOT_SEEN),
    ((1.4, None, 1.6), claims.NOT_SEEN),
    ((1.0, 1.0, 1.0), claims.NOT_SEEN),
])
def test_speedup_rule(per_seed, verdict):
    assert claims.speedup_verdict(axis(*per_seed), paper_min=3.0) == verdict


@pytest.mark.parametrize("better, worse, verdict", [
    (stats(5.0, 0.02), stats(5.1, 0.03), claims.REPRODUCED),  # gap 0.1 > 0.05
    (stats(5.0, 0.06), stats(5.1, 0.05), claims.NOT_SEEN),    # gap 0.1 < 0.11: noise
    (stats(5.1, 0.0), stats(5.1, 0.0), claims.NOT_SEEN),
    (stats(5.2, 0.0), stats(5.1, 0.0), claims.OPPOSITE),
    (stats(5.14, 0.03), stats(5.1, 0.02), claims.NOT_SEEN),   # higher, but within the spreads
])
def test_lower_loss_rule(better, worse, verdict):
    assert claims.lower_loss_verdict(better, worse) == verdict


@pytest.mark.parametrize("without, with_, verdict", [
    ((1, 0, 6), (0, 3, 6), claims.REPRODUCED),
    ((0, 4, 6), (0, 1, 6), claims.SMALLER),
    ((0, 0, 6), (0, 0, 6), claims.NOT_SEEN),
    ((1, 2, 6), (1, 0, 6), claims.NOT_SEEN),
    ((0, 1, 6), (0, 1, 6), claims.NOT_SEEN),
])
def test_stability_rule(without, with_, verdict):
    assert claims.stability_verdict(without, with_) == verdict


@pytest.mark.parametrize("cf10, cf125, cf20, verdict", [
    (stats(5.3, 0.01), stats(5.1, 0.01), stats(5.09, 0.01), claims.REPRODUCED),
    (stats(5.11, 0.01), stats(5.1, 0.01), stats(5.09, 0.01), claims.NOT_SEEN),
    (stats(5.3, 0.01), stats(5.2, 0.01), stats(5.0, 0.01), claims.NOT_SEEN),
])
def test_capacity_rule(cf10, cf125, cf20, verdict):
    assert claims.capacity_verdict(cf10, cf125, cf20) == verdict


def primer_summary():
    return {"name": "primer", "seeds": [0, 1, 2], "baseline": "vanilla_t5.1.1", "arms": {
        "vanilla_t5.1.1": arm(6.0, 0.02, flops=axis(1.0, 1.0, 1.0)),
        "primer_ez": arm(5.8, 0.01, flops=axis(1.5, 1.7, 1.6), seconds=axis(1.2, 1.3, 1.1)),
        "primer": arm(5.9, 0.03, flops=axis(1.1, 0.9, None)),
    }}


def test_a_row_holds_the_figures_and_the_verdict():
    table = claims.make_table({"primer": primer_summary()})
    ez = next(line for line in table.splitlines() if line.startswith("| Primer-EZ"))
    assert "1.60× (1.50–1.70) in FLOPs" in ez
    assert "1.20× (1.10–1.30) in wall time" in ez
    assert "eval loss 5.800 ± 0.010 vs 6.000 ± 0.020" in ez
    assert f"**{claims.SMALLER}**" in ez
    full = next(line for line in table.splitlines() if line.startswith("| Primer reaches"))
    assert "not reached (2/3 seeds reach it)" in full and f"**{claims.NOT_SEEN}**" in full
    # Experiments without a summary say so rather than vanish.
    zloss = [line for line in table.splitlines() if "z-loss" in line]
    assert zloss and all(f"**{claims.NOT_RUN}**" in line for line in zloss)
    assert "primer: 3 seeds, 4e+12 training FLOPs per run" in table
    # The command reruns what was measured: the budget it ran at, not the file's default.
    assert ez.endswith("| `python -m moetx.experiments.run --gin_file=experiments/primer.gin "
                       "--gin.BUDGET=4e12` |")
    assert all(line.endswith("--gin_file=experiments/router_zloss.gin` |") for line in zloss)


def test_a_wall_time_speedup_says_when_its_runs_lost_cpu_to_other_work():
    summary = primer_summary()
    ez_row = lambda: next(line for line in claims.make_table({"primer": summary}).splitlines()
                          if line.startswith("| Primer-EZ"))
    assert "lost" not in ez_row()  # not recorded
    summary["arms"]["primer_ez"]["host_cpu_cores"] = {
        "other": {"mean": 0.1, "spread": 0.1, "values": [0.0, 0.2, 0.1]}, "steal": None}
    assert "lost" not in ez_row()  # below LOADED_CORES
    summary["arms"]["vanilla_t5.1.1"]["host_cpu_cores"] = {
        "other": {"mean": 0.3, "spread": 0.45, "values": [0.0, 0.9, 0.0]},
        "steal": None}  # the baseline's runs count too
    assert ("1.20× (1.10–1.30) in wall time (a run lost 0.9 CPU cores to other work); "
            "eval loss") in ez_row()


def test_the_command_carries_the_budget_most_arms_ran_at():
    summary = primer_summary()
    for a in summary["arms"].values():
        a["budget"] = 1.5e13
    assert claims.budget_flag(summary) == " --gin.BUDGET=1.5e13"
    # An arm with a budget of its own (upcycling's base run) is not the experiment's BUDGET.
    summary["arms"]["primer"]["budget"] = 4e12
    assert claims.budget_flag(summary) == " --gin.BUDGET=1.5e13"
    # A tie goes to the baseline's budget.
    summary["arms"]["primer_ez"]["budget"] = 4e12
    summary["arms"]["extra"] = dict(summary["arms"]["primer"], budget=1.5e13)
    assert summary["baseline"] == "vanilla_t5.1.1"
    assert claims.budget_flag(summary) == " --gin.BUDGET=1.5e13"
    summary["arms"]["vanilla_t5.1.1"]["budget"] = 2e13
    summary["arms"]["extra"]["budget"] = 2e13
    assert claims.budget_flag(summary) == " --gin.BUDGET=2e13"


def test_a_quality_row_says_which_way_and_whether_within_the_spread():
    summary = {"name": "moe_vs_dense", "seeds": [0, 1, 2], "baseline": "dense", "arms": {
        "dense": arm(5.946, 0.022, flops=axis(1.0, 1.0, 1.0)),
        "switch_top1_e8": arm(5.965, 0.018, flops=axis(None, None, None)),
        "switch_top1_e16": arm(5.964, 0.019, flops=axis(None, None, None)),
        "st_moe_top2_e8": arm(6.030, 0.007, flops=axis(None, None, None)),
        "st_moe_top2_e16": arm(6.037, 0.008, flops=axis(None, None, None))}}
    table = claims.make_table({"moe_vs_dense": summary})
    row = next(line for line in table.splitlines() if line.startswith("| top-2 routing"))
    assert "eval loss 6.030 ± 0.007 vs 5.965 ± 0.018: higher by 0.065 |" in row
    assert f"**{claims.OPPOSITE}**" in row
    summary["arms"]["st_moe_top2_e8"] = arm(5.960, 0.007, flops=axis(1.1, 1.1, 1.1))
    row = next(line for line in claims.make_table({"moe_vs_dense": summary}).splitlines()
               if line.startswith("| top-2 routing"))
    assert "lower by 0.005 (within the seeds' spread)" in row and claims.NOT_SEEN in row


def test_a_missing_arm_is_named():
    summary = primer_summary()
    del summary["arms"]["primer_ez"]
    with pytest.raises(ValueError, match="no arm 'primer_ez'"):
        claims.make_table({"primer": summary})


def test_main_rewrites_only_the_marked_section_and_archives_what_regenerates_it(tmp_path):
    runs = tmp_path / "runs"
    (runs / "primer").mkdir(parents=True)
    (runs / "primer" / "summary.json").write_text(json.dumps(primer_summary()))
    (runs / "primer" / "curves.json").write_text("{}")
    (runs / "primer" / "loss_vs_flops.png").write_bytes(b"png")
    (runs / "primer" / "checkpoint_130").mkdir()  # runs are not archived, only their results
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{claims.START}\nold\n{claims.END}\nafter\n")
    docs = tmp_path / "docs"
    assert claims.main(["--runs", str(runs), "--write", str(readme),
                        "--archive", str(docs)]) == 0
    text = readme.read_text()
    assert text.startswith(f"before\n{claims.START}\n| claim |") and "old" not in text
    assert text.endswith(f"{claims.END}\nafter\n")
    assert sorted(p.name for p in (docs / "primer").iterdir()) == [
        "curves.json", "loss_vs_flops.png", "summary.json"]
    # The archive alone regenerates the same table once the runs are gone.
    table = claims.make_table(claims.load_summaries([str(runs)], ["primer"]))
    assert claims.make_table(claims.load_summaries([str(docs)], ["primer"])) == table
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="not found"):
        claims.main(["--runs", str(runs), "--write", str(readme)])
    assert readme.read_text() == "no markers\n"


def test_the_first_runs_directory_holding_an_experiment_wins(tmp_path):
    new, old = tmp_path / "new", tmp_path / "archive"
    longer = primer_summary()
    longer["arms"]["primer"]["steps"] = 1300
    for root, summary in ((new, longer), (old, primer_summary())):
        (root / "primer").mkdir(parents=True)
        (root / "primer" / "summary.json").write_text(json.dumps(summary))
    (old / "capacity").mkdir()
    (old / "capacity" / "summary.json").write_text(json.dumps({"name": "capacity"}))
    found = claims.find_runs([str(new), str(old)], ["primer", "capacity", "upcycling"])
    assert found == {"primer": str(new / "primer"), "capacity": str(old / "capacity")}
    loaded = claims.load_summaries([str(new), str(old)], ["primer", "capacity"])
    assert loaded["primer"]["arms"]["primer"]["steps"] == 1300
    assert loaded["capacity"] == {"name": "capacity"}


def test_every_claim_names_arms_of_its_experiment_file(tmp_path, clean_gin):
    """A renamed arm in a gin file would otherwise surface only after hours of training."""
    for name in dict.fromkeys(c.experiment for c in claims.CLAIMS):
        gin.clear_config()
        gin_files.parse_files([f"experiments/{name}.gin"], [f"OUTPUT_DIR = '{tmp_path}'"])
        exp = experiment.Experiment()
        summary = {"name": name, "seeds": list(exp.seeds), "baseline": exp.baseline_arm,
                   "arms": {a: arm(5.0, 0.0, flops=axis(1.2, 1.2, 1.2), dropped=stats(0.01))
                            for a in exp.arms}}
        rows = [line for line in claims.make_table({name: summary}).splitlines()
                if f"experiments/{name}.gin" in line]
        assert rows and all(claims.NOT_RUN not in line for line in rows), name
