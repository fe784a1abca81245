"""`pdcluster plan`: the cost model fitted from a profile and the discrete-event simulation
of static layouts, checked against answers computed by hand on a synthetic profile."""
import json

import pytest

from cluster.plan.costs import CostModel
from cluster.plan.goodput import Limits, Slo, goodput
from cluster.plan.simulate import Layout, SimRequest, layouts_for, simulate
from cluster.plan.workload import Workload

# prefill 0.1 ms a token (a 1000-token prompt: 0.1 s), a decode step 10 ms whatever the
# batch, free transfers: samples on those lines, so the fit is exact
PROFILE = {"prefill": [[100, 0.01], [1000, 0.1], [4000, 0.4]],
           "decode": [[1, 100, 0.01], [8, 5000, 0.01], [32, 900, 0.01], [4, 20000, 0.01]],
           "transfer": [[0, 0.0], [1 << 20, 0.0]], "kv_bytes_per_token": 1024}
# evenly spaced 1000-token prompts, 21 output tokens (the first from prefill, 20 decode steps)
WORKLOAD = Workload(input_len=1000, output_len=21, num_requests=40, arrival="uniform")
LIMITS = Limits(max_prefill_tokens=1000)
RATES = [4, 9, 12, 25]


def costs() -> CostModel:
    return CostModel.from_profile(PROFILE)


def test_fit_recovers_the_lines_the_samples_lie_on():
    c = costs()
    assert c.prefill(2000) == pytest.approx(0.2)
    assert c.decode_step(64, 123456) == pytest.approx(0.01)
    assert c.transfer(1000) == pytest.approx(0.0, abs=1e-12)


def test_fit_keeps_every_term_non_negative_when_batch_and_context_move_together():
    # a run's steps: context ~45 tokens a request and noise; a free fit trades batch against
    # context (one goes negative), and clipping that one alone left the other inflated 6x
    rows = [[1, 44.5, 0.167], [2, 94.0, 0.191], [3, 140, 0.184], [4, 181.0, 0.222]]
    c = CostModel.from_profile({**PROFILE, "decode": rows})
    assert all(x >= 0 for x in c.decode_coef)
    assert all(c.decode_step(b, ctx) == pytest.approx(s, rel=0.1) for b, ctx, s in rows)


def test_one_request_through_1p1d_and_unified_takes_the_hand_computed_times():
    pd = simulate(Layout(1, 1), costs(), [SimRequest(0.0, 1000, 21)])[0]
    assert pd.ttft == pytest.approx(0.1) and pd.tpot == pytest.approx(0.01)      # 0.1 + 20 x 0.01
    uni = simulate(Layout(unified=1), costs(), [SimRequest(0.0, 1000, 21)])[0]
    assert uni.ttft == pytest.approx(0.1) and uni.finished_at == pytest.approx(0.3)


def test_1p1d_first_tokens_and_joins_follow_the_overlap_loop_and_the_handoff():
    # the measured layout, by hand: prefill 0.1 s, transfer 5 ms, decode steps 10 ms. A busy
    # worker reads a message at its step's end and a request it reads joins the step after next;
    # the first token counts when decode has read the landed KV, as the cluster streams it.
    # A (t=0): all idle; prefill 0-0.1, lands 0.105: TTFT 0.105, steps 0.105-0.305.
    # B (t=0.2): decode reads it at 0.205 (decode_ready), prefill 0.205-0.305, lands 0.31 while
    #   decode runs the step A rides past its end (0.305-0.315): read 0.315, TTFT 0.115.
    # C (t=0.21): decode reads it at 0.215, prefill busy with B until 0.305, then 0.305-0.405,
    #   lands 0.41, read at 0.415 (TTFT 0.205); the step 0.415-0.425 was launched without it,
    #   so its 20 steps run 0.425-0.625: TPOT (0.625 - 0.415) / 20.
    costs = CostModel.from_profile({**PROFILE, "transfer": [[0, 0.005], [1 << 20, 0.005]]})
    a, b, c = simulate(Layout(1, 1), costs, [SimRequest(0.0, 1000, 21), SimRequest(0.2, 1000, 21),
                                             SimRequest(0.21, 1000, 21)])
    assert [a.ttft, b.ttft, c.ttft] == pytest.approx([0.105, 0.115, 0.205])
    assert [a.tpot, b.tpot] == pytest.approx([0.01, 0.01])
    assert c.finished_at == pytest.approx(0.625) and c.tpot == pytest.approx(0.0105)


def test_prefill_and_decode_steps_that_overlap_the_other_role_stretch_by_the_co_run_factors():
    # prefill x2 while decode steps, decode x1.5 while prefill runs; transfer 4 ms.
    # A (t=0) alone: lands 0.104; its steps 0.104-0.114 and 0.114-0.124 (launched before B's prefill)
    # B (t=0.11): read at 0.114, prefill 0.114-0.314 (0.2 s: decode busy); A's steps starting at
    # 0.124 + 0.015k while it runs take 15 ms (k = 0..12, the last ends 0.319), its last five 10 ms
    costs = CostModel.from_profile({**PROFILE, "transfer": [[0, 0.004], [1 << 20, 0.004]],
                                    "co_run": {"prefill": 2.0, "decode": 1.5}})
    a, b = simulate(Layout(1, 1), costs, [SimRequest(0.0, 1000, 21), SimRequest(0.11, 1000, 21)])
    assert a.ttft == pytest.approx(0.104) and a.finished_at == pytest.approx(0.369)
    assert b.ttft == pytest.approx(0.319 - 0.11)


def test_co_run_factors_compare_forwards_during_decode_with_alone_and_steps_inside_with_outside():
    from cluster.plan.co_run import co_run_factors

    def prompt(start, seconds):
        return {"arrival_unix_s": start, "phases": [{"phase": "prefill_forward", "start_s": 0.0, "end_s": seconds}]}

    def decode(times):
        return {"arrival_unix_s": 0.0, "tokens": [{"t_s": t} for t in times]}
    alone = [prompt(0, 0.2), prompt(1, 0.3), prompt(2, 0.2)]
    # decode steps 100 ms apart from 10.0, 150 ms while the prompt 10.3-10.75 runs; a prompt
    # before the decodes' first steps does not count
    steps = [10.0, 10.1, 10.2, 10.3, 10.45, 10.6, 10.75, 10.85, 10.95, 11.05]
    prompts = [prompt(9.0, 0.9), prompt(10.3, 0.45)]
    assert co_run_factors(alone, prompts, [decode([9.5] + steps)] * 2) == {"prefill": 2.25, "decode": 1.5}


def test_a_prompt_joining_a_unified_worker_slows_the_decodes_it_joins():
    # the second prompt arrives mid-decode of the first: one step costs 0.1 + 0.01
    a, b = simulate(Layout(unified=1), costs(), [SimRequest(0.0, 1000, 21), SimRequest(0.15, 1000, 21)])
    assert a.finished_at == pytest.approx(0.3 + 0.1)
    assert a.tpot == pytest.approx((19 * 0.01 + 0.11) / 20)


def test_plan_picks_disaggregation_under_tight_tpot_and_unified_under_loose():
    # tight TPOT (12 ms): 1P1D prefills 10 prompts/s without queueing (TTFT 0.1 s) and its
    # decode steps stay 10 ms, so it holds up to 9 req/s of the grid; two unified workers
    # interfere once a worker's arrivals come closer than a request's 0.3 s life
    # (2 / rate < 0.3: above 6.7 req/s), every request then pays a 110 ms step: 15 ms TPOT
    tight = Slo(ttft=0.2, tpot=0.012)
    assert goodput(Layout(1, 1), costs(), WORKLOAD, tight, rates=RATES, limits=LIMITS) == 9
    assert goodput(Layout(unified=2), costs(), WORKLOAD, tight, rates=RATES, limits=LIMITS) == 4
    # loose TPOT: unified prefills on both GPUs; at 12 req/s a worker's 0.11 s steps keep up
    # with its 0.167 s gaps (TTFT <= 0.12 s) while 1P1D's single prefill queue grows 17 ms a
    # request past its 10/s (the 7th waits beyond 0.2 s); at 25 req/s both queues grow
    loose = Slo(ttft=0.2, tpot=1.0)
    assert goodput(Layout(1, 1), costs(), WORKLOAD, loose, rates=RATES, limits=LIMITS) == 9
    assert goodput(Layout(unified=2), costs(), WORKLOAD, loose, rates=RATES, limits=LIMITS) == 12


def test_layouts_of_n_gpus_are_all_unified_or_every_xpyd_split():
    assert [l.name for l in layouts_for(3)] == ["unified x3", "1P2D", "2P1D"]


def test_workload_file_reads_distributions_and_refuses_unknown_keys(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"input_len": [10, 20], "output_len": 5, "num_requests": 50, "seed": 3}))
    w = Workload.load(str(path))
    reqs = w.requests(2.0)
    assert {r.input_len for r in reqs} == {10, 20} and len(reqs) == 50
    assert [r.input_len for r in reqs] == [r.input_len for r in w.requests(2.0)]     # seeded
    path.write_text(json.dumps({"rate": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        Workload.load(str(path))


def test_plan_cli_prints_every_layout_and_the_best(tmp_path, capsys):
    from cluster.launch.cli import main
    profile, workload = tmp_path / "p.json", tmp_path / "w.json"
    profile.write_text(json.dumps({**PROFILE, "max_prefill_tokens": 1000}))
    workload.write_text(json.dumps({"input_len": 1000, "output_len": 21, "num_requests": 40,
                                    "arrival": "uniform"}))
    assert main(["plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft", "0.2",
                 "--slo-tpot", "0.012", "--workload", str(workload)]) == 0
    out = capsys.readouterr().out
    assert "unified x2" in out and "1P1D" in out and "best: 1P1D" in out
    assert main(["plan", "--profile", str(profile), "--gpus", "2", "--slo-ttft", "0.2", "--slo-tpot", "0.012",
                 "--workload", str(workload), "--layout", "1P1D", "--rates", "4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["layouts"]
    assert row["layout"] == "1P1D" and row["goodput_rps"] is not None
    (at,) = row["at_rates"]
    assert at["rate"] == 4 and at["num_requests"] == 40 and at["slo_attainment"] == 1.0
    assert 100 <= at["median_ttft_ms"] <= 120 and at["mean_tpot_ms"] == pytest.approx(10.0)


def test_tp_layouts_use_every_gpu_and_name_their_tp():
    assert [l.name for l in layouts_for(4, (1, 2))] == [
        "unified x4", "unified x2(tp2)", "1P3D", "2P2D", "3P1D", "2P1D(tp2)", "1P(tp2)2D", "1P(tp2)1D(tp2)"]
    assert all(l.gpus == 4 for l in layouts_for(4, (1, 2)))
    assert [l.name for l in layouts_for(3, (1, 2))] == ["unified x3", "1P2D", "2P1D", "1P1D(tp2)", "1P(tp2)1D"]


def test_a_tp_worker_runs_its_steps_tp_times_efficiency_faster():
    # tp 2 at efficiency 0.75: steps 1.5x faster; a 1000-token prompt 0.1 / 1.5 s, each decode step 10 / 1.5 ms
    c = CostModel.from_profile({**PROFILE, "tp_efficiency": 0.75})
    uni = simulate(Layout(unified=1, unified_tp=2), c, [SimRequest(0.0, 1000, 21)])[0]
    assert uni.ttft == pytest.approx(0.1 / 1.5) and uni.tpot == pytest.approx(0.01 / 1.5)
    pd = simulate(Layout(1, 1, decode_tp=2), c, [SimRequest(0.0, 1000, 21)])[0]
    assert pd.ttft == pytest.approx(0.1) and pd.tpot == pytest.approx(0.01 / 1.5)
    assert c.for_tp(2).transfer(1000) == c.transfer(1000)


def test_plan_with_tp_picks_the_faster_decode_under_a_tpot_only_tp_meets():
    # TPOT 8 ms: no one-GPU decode step (10 ms) meets it; decode at tp 2 (10 / 1.6 = 6.25 ms) does
    from cluster.plan.cli import plan
    slo = Slo(ttft=0.2, tpot=0.008)
    out = plan({**PROFILE, "max_prefill_tokens": 1000}, 3, slo, WORKLOAD, tps=(1, 2), tp_efficiency=0.8)
    rows = {r["layout"]: r["goodput_rps"] for r in out["layouts"]}
    assert rows["2P1D"] is None and rows["1P2D"] is None and rows["unified x3"] is None
    assert out["best"]["layout"] == "1P1D(tp2)" and out["tp_efficiency"] == 0.8
