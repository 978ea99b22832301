"""The experiment runner's pure functions against hand computations: curves aggregated over
seeds (mean, spread, interpolation), a run's record from its scalars (FLOPs, wall time without
compilation, spikes, dropped tokens), and the summary's speed-ups to equal loss."""

import pytest

from moetx.experiments import curves


def test_aggregate_interpolates_each_curve_and_takes_mean_and_half_range():
    a = [(0, 10.0), (10, 6.0), (20, 4.0)]
    b = [(0, 12.0), (20, 6.0)]           # at x=10: 9.0 by interpolation
    c = [(0, 11.0), (10, 7.0)]           # stops at 10: absent at 20
    out = curves.aggregate([a, b, c])
    assert [p["x"] for p in out] == [0.0, 10.0, 20.0]
    at0, at10, at20 = out
    assert at0["mean"] == pytest.approx(11.0) and at0["spread"] == pytest.approx(1.0)
    assert (at0["min"], at0["max"], at0["n"]) == (10.0, 12.0, 3)
    assert at10["mean"] == pytest.approx((6.0 + 9.0 + 7.0) / 3)
    assert at10["spread"] == pytest.approx((9.0 - 6.0) / 2) and at10["n"] == 3
    assert at20["mean"] == pytest.approx(5.0) and at20["n"] == 2
    assert at20["spread"] == pytest.approx(1.0)
    # Given x points; one outside every curve is left out.
    assert [p["x"] for p in curves.aggregate([a, b], xs=[5, 25])] == [5.0]
    assert curves.aggregate([a, b], xs=[5])[0]["mean"] == pytest.approx((8.0 + 10.5) / 2)


def test_interpolate_within_the_range_only():
    curve = [(2, 4.0), (4, 2.0)]
    assert curves.interpolate(curve, 3) == pytest.approx(3.0)
    assert curves.interpolate(curve, 4) == pytest.approx(2.0)
    assert curves.interpolate(curve, 1) is None and curves.interpolate(curve, 5) is None
    assert curves.interpolate([], 1) is None


def _scalars():
    ev = {"cross_ent_loss": [(10, 5.0), (20, 4.0)], "loss": [(10, 5.1), (20, 4.1)],
          "moe_fraction_dropped": [(10, 0.02), (20, 0.01)]}
    tr = {"loss": [(5, 6.0), (10, 5.6), (15, 9.0), (20, 5.2)],
          "cross_ent_loss": [(5, 5.9), (10, 5.5), (15, 8.9), (20, 5.1)],
          "timing/seconds": [(5, 9.0), (10, 2.0), (15, 2.0), (20, 3.0)],
          "timing/compilation_seconds": [(5, 8.0)],
          "moe_fraction_dropped": [(5, 0.3), (10, 0.2), (15, 0.1), (20, 0.2)],
          "rewound_from_step": [(12, 14.0)]}
    return ev, tr


def test_a_run_record_from_its_scalars():
    ev, tr = _scalars()
    rec = curves.run_record(ev, tr, flops_per_step=100.0, start_step=0, failure=None,
                            spike_factor=1.5, spike_window=2)
    # Wall time: the windows' seconds less the compilation logged with the first (9 - 8 = 1).
    assert curves.wall_clock(tr, 0) == [(0, 0.0), (5, 1.0), (10, 3.0), (15, 5.0), (20, 8.0)]
    assert rec["eval"] == [{"step": 10, "flops": 1000.0, "seconds": 3.0, "loss": 5.0},
                           {"step": 20, "flops": 2000.0, "seconds": 8.0, "loss": 4.0}]
    assert rec["final_eval_loss"] == 4.0 and rec["final_train_loss"] == 5.1
    assert rec["seconds"] == 8.0 and rec["compilation_seconds"] == 8.0
    # Windows without compilation: 2/5, 2/5, 3/5 s per step -> median 0.4.
    assert rec["seconds_per_step"] == pytest.approx(0.4)
    # 9.0 > 1.5 x mean(6.0, 5.6); 5.2 is compared with (6.0, 5.6): the spike is not kept.
    assert rec["loss_spikes"] == [15]
    assert rec["rewinds"] == 1
    assert rec["train_fraction_dropped"] == pytest.approx(0.2)
    assert rec["eval_fraction_dropped"] == 0.01
    assert rec["failure"] is None
    # Not logged (a run from before the trainer recorded it, or not on Linux): None.
    assert rec["host_cpu_cores"] == {"other": None, "steal": None}
    assert rec["input_seconds_per_step"] is None


def test_a_run_records_the_cpu_it_lost_weighted_by_each_windows_seconds():
    ev, tr = _scalars()
    tr["host/other_cpu_cores"] = [(5, 0.0), (10, 1.0), (15, 0.0), (20, 0.5)]
    tr["host/steal_cpu_cores"] = [(5, 0.0), (10, 0.8), (15, 0.0), (20, 0.0)]
    rec = curves.run_record(ev, tr, flops_per_step=1.0, start_step=0, failure=None,
                            spike_factor=1.5, spike_window=2)
    # Windows of 9, 2, 2 and 3 s: (0 x 9 + 1 x 2 + 0 x 2 + 0.5 x 3) / 16.
    assert rec["host_cpu_cores"]["other"] == pytest.approx(3.5 / 16)
    assert rec["host_cpu_cores"]["steal"] == pytest.approx(1.6 / 16)
    # From a later start, only the windows past it count: (0 x 2 + 0.5 x 3) / 5.
    later = curves.run_record(ev, tr, flops_per_step=1.0, start_step=10, failure=None,
                              spike_factor=1.5, spike_window=2)
    assert later["host_cpu_cores"]["other"] == pytest.approx(1.5 / 5)


def test_a_run_records_its_input_time_per_step():
    ev, tr = _scalars()
    tr["timing/input_seconds"] = [(5, 0.5), (10, 0.1), (15, 0.2), (20, 0.2)]
    rec = curves.run_record(ev, tr, flops_per_step=1.0, start_step=0, failure=None,
                            spike_factor=1.5, spike_window=2)
    assert rec["input_seconds_per_step"] == pytest.approx(1.0 / 20)
    assert curves.input_seconds_per_step(tr, 10) == pytest.approx(0.4 / 10)


def test_a_run_that_starts_later_counts_flops_and_seconds_from_its_start():
    ev, tr = _scalars()
    ev = {"cross_ent_loss": [(10, 5.0), (20, 4.0)]}
    rec = curves.run_record(ev, tr, flops_per_step=100.0, start_step=10, failure=None,
                            spike_factor=1.5, spike_window=2)
    assert [(p["flops"], p["seconds"]) for p in rec["eval"]] == [(0.0, 0.0), (1000.0, 5.0)]


def test_a_failed_run_keeps_its_curve_but_has_no_final_loss():
    ev, tr = _scalars()
    rec = curves.run_record(ev, tr, flops_per_step=1.0, start_step=0,
                            failure="The run diverged at step 20", spike_factor=1.5,
                            spike_window=2)
    assert rec["final_eval_loss"] is None and rec["final_train_loss"] is None
    assert len(rec["eval"]) == 2 and rec["failure"].startswith("The run diverged")


def _record(points, failure=None):
    """A run record with eval points [(step, seconds, loss)] at 10 FLOPs per step."""
    return {"eval": [{"step": s, "flops": 10.0 * s, "seconds": t, "loss": y}
                     for s, t, y in points],
            "final_eval_loss": None if failure else points[-1][2], "final_train_loss": None,
            "failure": failure, "loss_spikes": [], "rewinds": 0, "seconds_per_step": 1.0,
            "train_fraction_dropped": None, "eval_fraction_dropped": None}


def _arm(seeds, fps=10.0, start=0, start_from=None):
    return {"budget": 100.0, "flops_per_step": fps, "steps": 10, "start_step": start,
            "start_from": start_from, "seeds": seeds,
            "mean": curves.arm_curve(seeds, fps, start)}


def test_summary_speedups_per_seed_and_their_mean():
    base = _arm({"0": _record([(5, 5.0, 6.0), (10, 10.0, 5.0)]),
                 "1": _record([(5, 5.0, 6.2), (10, 10.0, 5.2)])})
    # Seed 0 reaches 5.0 halfway between steps 4 (5.5) and 6 (4.5): 5 steps; in half the
    # seconds per step (2.5 s). Seed 1 reaches 5.2 at step 4 exactly.
    fast = _arm({"0": _record([(4, 2.0, 5.5), (6, 3.0, 4.5)]),
                 "1": _record([(4, 2.0, 5.2), (6, 3.0, 4.8)])})
    slow = _arm({"0": _record([(10, 10.0, 5.5)]), "1": _record([(10, 10.0, 5.1)])})
    failed = _arm({"0": _record([(5, 5.0, 6.0)], failure="diverged"),
                   "1": _record([(10, 10.0, 5.0)])})
    later = _arm({"0": _record([(10, 0.0, 4.0), (20, 10.0, 3.0)])}, start=10,
                 start_from="base")
    out = curves.summarize({"base": base, "fast": fast, "slow": slow, "failed": failed,
                            "later": later}, "base")
    assert out["baseline"] == "base"
    arms = out["arms"]
    assert arms["base"]["speedup"]["flops"]["per_seed"] == {"0": 1.0, "1": 1.0}
    sf = arms["fast"]["speedup"]
    assert sf["steps"]["per_seed"] == pytest.approx({"0": 10 / 5, "1": 10 / 4})
    assert sf["flops"]["per_seed"] == pytest.approx({"0": 100 / 50, "1": 100 / 40})
    assert sf["seconds"]["per_seed"] == pytest.approx({"0": 10 / 2.5, "1": 10 / 2.0})
    assert sf["flops"]["mean"] == pytest.approx((2.0 + 2.5) / 2)
    assert sf["flops"]["reached"] == "2/2"
    # Mean curves: base's ends at 5.1 (step 10); fast's is 5.35 at step 4 and 4.65 at 6, so it
    # reaches 5.1 at step 4 + 2 x 0.25 / 0.7.
    assert sf["steps"]["of_mean_curves"] == pytest.approx(10 / (4 + 2 * 0.25 / 0.7))
    ss = arms["slow"]["speedup"]["flops"]
    # Seed 0 ends at 5.5, above the baseline's 5.0; seed 1's 5.1 beats 5.2 at the same step.
    assert ss["per_seed"] == {"0": None, "1": pytest.approx(1.0)}
    assert ss["mean"] is None and ss["reached"] == "1/2"
    assert arms["failed"]["failures"] == {"0": "diverged"}
    assert arms["failed"]["final_eval_loss"]["values"] == [5.0]
    assert arms["failed"]["speedup"]["flops"]["per_seed"]["0"] is None
    assert arms["later"]["speedup"] is None  # starts elsewhere: not comparable
    assert arms["fast"]["final_eval_loss"]["mean"] == pytest.approx(4.65)
    assert arms["fast"]["final_eval_loss"]["spread"] == pytest.approx(0.15)
    md = curves.summary_markdown("demo", out, "budget note")
    assert "| fast | 10 | 10 | 4.6500 ± 0.1500 | 2.25× (2.00–2.50) |" in md
    assert "| slow |" in md and "- (1/2 seeds reach it)" in md and "| later |" in md
    assert "n/a" in md
    assert "CPU lost" not in md  # no run recorded it
    # The CPU each seed lost, where the runs recorded it.
    fast["seeds"]["1"]["host_cpu_cores"] = {"other": 0.9, "steal": 0.85}  # seed 0: none
    out = curves.summarize({"base": base, "fast": fast}, "base")
    assert out["arms"]["fast"]["host_cpu_cores"]["other"]["values"] == [0.9]
    assert out["arms"]["fast"]["other_cpu_cores_per_seed"] == {"0": None, "1": 0.9}
    assert out["arms"]["base"]["host_cpu_cores"] == {"other": None, "steal": None}
    md = curves.summary_markdown("demo", out, "")
    assert "| CPU lost to other work (cores) |" in md.splitlines()[4]
    assert md.splitlines()[7].endswith("| -, 0.90 |")  # fast's row, per seed
    assert md.splitlines()[6].endswith("| -, - |")  # base's row


def test_the_mean_curve_leaves_out_failed_seeds():
    seeds = {"0": _record([(5, 1.0, 6.0), (10, 2.0, 5.0)]),
             "1": _record([(5, 3.0, 7.0), (10, 4.0, 6.0)]),
             "2": _record([(5, 1.0, 99.0)], failure="diverged")}
    mean = curves.arm_curve(seeds, 10.0, 0)
    assert [(p["step"], p["flops"], p["seconds"], p["loss"], p["spread"], p["n"])
            for p in mean] == [(5, 50.0, 2.0, 6.5, 0.5, 2), (10, 100.0, 3.0, 5.5, 0.5, 2)]


def test_loss_spikes_follow_the_divergence_monitor_rule():
    losses = [(1, 4.0), (2, 4.0), (3, 6.1), (4, 4.0), (5, float("nan")), (6, 3.9)]
    assert curves.loss_spikes(losses, 1.5, 2) == [3, 5]
    assert curves.loss_spikes(losses, 1.6, 2) == [5]
