"""The simulator against the published bubble formulas, and its behaviour off their assumptions.

Notation as in DeepSeek's DualPipe README: F forward, B a *full* backward chunk (input and
weight gradients), W its weight part, F&B an overlapped pair; PP = stages (2 x ranks for
DualPipeV). In the IR, a B action is the input-gradient part, B - W.
"""

from __future__ import annotations

import math
import time

import pytest

from dualpipe_mhc import load_config
from dualpipe_mhc.scheduler import Costs, ScheduleError, add_comms, build_schedule, simulate
from dualpipe_mhc.scheduler.analytic import costs_from_config
from dualpipe_mhc.scheduler.planner import resolve_block_layers

PPS = (2, 4, 8, 16)


def _bubble(name: str, ranks: int, mb: int, f: float, b_full: float, w: float, overlap: float = 1.0) -> float:
    sched = build_schedule(name, ranks, mb)
    result = simulate(sched, Costs.uniform(sched.num_stages, f, b_full - w, w, fb_overlap=overlap))
    # Uniform stages give every rank of 1F1B/ZB1P the same work; in DualPipe(V) ranks run
    # different numbers of overlapped pairs, and the formula is the worst rank's bubble.
    return max(result.bubble)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("f, b, w", [(1.0, 2.0, 1.0), (1.0, 2.0, 0.7), (2.0, 2.0, 1.0), (1.0, 2.0, 1.4)])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp, f, b, w):
    for mb in (pp, 2 * pp + 1, 4 * pp):
        assert _bubble("1f1b", pp, mb, f, b, w) == pytest.approx((pp - 1) * (f + b))


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("f, b, w", [(1.0, 2.0, 1.0), (1.0, 2.0, 0.7), (2.0, 2.0, 1.0), (1.0, 2.5, 1.0)])
def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w(pp, f, b, w):
    for mb in (pp, 2 * pp + 1, 4 * pp):
        assert _bubble("zb1p", pp, mb, f, b, w) == pytest.approx((pp - 1) * (f + b - 2 * w))


def test_zb1p_formula_needs_w_no_larger_than_the_input_backward():
    # ZB-H1's bound assumes W <= B - W. With a heavier W the last rank's deferred W's can no
    # longer cover the drain, and the bubble is the warm-up's (PP-1) F (the formula would say 0.6).
    assert _bubble("zb1p", 4, 16, 1.0, 2.0, 1.4) == pytest.approx(3 * 1.0)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("f, b, w, overlap", [(1.0, 2.0, 1.0, 1.0), (1.0, 1.5, 0.5, 1.0), (1.0, 2.0, 1.0, 0.8), (1.2, 1.8, 0.6, 0.9)])
def test_dualpipe_bubbles_match_the_formula_when_f_equals_the_input_backward(pp, f, b, w, overlap):
    """(PP/2-1)(F&B + B - 3W) with F = B - W (the formula's implicit assumption, see below)."""
    fb = overlap * (f + b)
    expected = (pp / 2 - 1) * (fb + b - 3 * w)
    for mb in (2 * pp, 2 * pp + 6, 4 * pp):
        assert _bubble("dualpipe", pp, mb, f, b, w, overlap) == pytest.approx(expected)
        assert _bubble("dualpipev", pp // 2, mb, f, b, w, overlap) == pytest.approx(expected)
        # DualPipeV takes odd counts too (all micro-batches enter at rank 0): the same bubble
        assert _bubble("dualpipev", pp // 2, mb + 1, f, b, w, overlap) == pytest.approx(expected)


@pytest.mark.parametrize(
    "f, b, w, exact_at_4",
    [(1.0, 2.0, 0.7, True), (1.5, 1.7, 0.5, True), (2.0, 2.0, 1.0, True), (1.0, 2.5, 1.0, True), (1.0, 3.0, 0.5, False)],
)
def test_dualpipe_with_f_unlike_the_input_backward_lies_between_the_f_and_b_versions(f, b, w, exact_at_4):
    """Why DualPipe(V) misses the formula when F != B - W. DeepSeek's 8-step program
    (reproduced action for action, and its bubble matches whenever F = B - W) has warm-up
    and cool-down slots that are forwards on some ranks and input-backwards on others,
    while the formula books every slot as an input-backward B - W. So the simulated bubble is
    (PP/2-1)(F&B + X - 2W) with X between F and B - W: exactly F at PP = 4 (one slot) while
    B - W stays within 1.5 F, and moving towards B - W as PP grows. The schedule is not at fault; the formula assumes
    F = B - W, as in the DualPipe README's figure where F and B blocks have equal length."""
    fb = f + b
    for pp in (4, 8, 16):
        f_version = (pp / 2 - 1) * (fb + f - 2 * w)
        b_version = (pp / 2 - 1) * (fb + (b - w) - 2 * w)  # = the formula (PP/2-1)(F&B + B - 3W)
        for mb in (2 * pp, 4 * pp):
            got = _bubble("dualpipe", pp, mb, f, b, w)
            assert got == pytest.approx(_bubble("dualpipev", pp // 2, mb, f, b, w))
            if pp == 4 and exact_at_4:
                assert got == pytest.approx(f_version)
            lo, hi = sorted((f_version, b_version))
            assert lo - 1e-9 <= got <= hi + 1e-9
            assert got != pytest.approx(b_version)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_explicit_comms_do_not_change_the_simulation(name):
    sched = build_schedule(name, 4, 8)
    costs = Costs.uniform(sched.num_stages, 1.0, 1.0, 0.5, act_bytes=1e6, link_bandwidth=1e7, link_latency=0.01)
    assert simulate(add_comms(sched), costs).step_time == simulate(sched, costs).step_time


def _paper(**overrides):
    return load_config("paper-27b", [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_step_time_never_drops_when_bandwidth_drops_or_n_grows(name):
    cfg = _paper()
    sched = build_schedule(name, 8, 32)
    by_bandwidth = []
    for gbps in (math.inf, 450.0, 200.0, 50.0, 10.0, 1.0):
        costs = costs_from_config(cfg, sched.num_stages)
        costs = costs.with_link(gbps * 1e9, cfg.link.latency)
        by_bandwidth.append(simulate(sched, costs, record_events=False).step_time)
    assert by_bandwidth == sorted(by_bandwidth)
    assert by_bandwidth[-1] > by_bandwidth[0]
    by_streams = [simulate(sched, costs_from_config(cfg, sched.num_stages, streams=n)).step_time for n in (1, 2, 4, 8)]
    assert by_streams == sorted(by_streams) and by_streams[-1] > by_streams[0]


def test_n4_on_an_h800_link_reports_exposed_communication():
    cfg = _paper()
    sched = build_schedule("dualpipev", 8, 32)
    at_n4 = simulate(sched, costs_from_config(cfg, 16, streams=4))
    at_n1 = simulate(sched, costs_from_config(cfg, 16, streams=1))
    assert max(at_n4.exposed_comm) > 0
    assert sum(at_n4.exposed_comm) > 2 * sum(at_n1.exposed_comm)  # 4x the bytes on the same link
    assert sum(at_n4.comm_time) == pytest.approx(
        sum(at_n1.comm_time) * 4, rel=0.01
    )  # latency (3 us) is small next to ~1 ms of wire time per message
    assert all(e <= b + 1e-12 for e, b in zip(at_n4.exposed_comm, at_n4.bubble))


def test_recomputation_costs_time_and_saves_memory():
    sched = build_schedule("dualpipev", 8, 32)
    plain = costs_from_config(_paper(), 16)
    cfg = _paper(**{"recompute.enabled": "true", "recompute.block_layers": 2})
    recomputed = costs_from_config(cfg, 16, recompute_block=resolve_block_layers(cfg))
    a, b = simulate(sched, plain), simulate(sched, recomputed)
    assert b.step_time > a.step_time
    assert max(b.peak_activation_bytes) < max(a.peak_activation_bytes)


def test_uneven_stages_add_bubble_beyond_the_formula():
    # The paper model's LM head sits on the last stage: with an even split that stage's extra
    # work shows as bubble (model.split=balanced moves layers off it: see test_split.py).
    sched = build_schedule("1f1b", 8, 32)
    costs = costs_from_config(_paper(**{"model.split": "even"}), 8, streams=1)
    result = simulate(sched, costs)
    f, b = costs.f[1], costs.b[1] + costs.w[1]
    assert min(result.bubble) > 7 * (f + b)


def test_simulation_of_a_deadlocked_schedule_fails_naming_the_ranks():
    sched = build_schedule("1f1b", 2, 2)
    f0, f1, b0, b1 = sched.actions[0]
    sched.actions[0] = [f0, b0, f1, b1]
    sched.actions[1] = [a for a in sched.actions[1] if a.kind == "F"] + [a for a in sched.actions[1] if a.kind == "B"]
    with pytest.raises(ScheduleError, match="rank 0 at B0.s0.c0@r0"):
        simulate(sched, Costs.uniform(2, 1, 1, 1))


def test_costs_must_match_the_schedule_stages():
    with pytest.raises(ScheduleError, match="costs give 4 stages but the dualpipev schedule has 8"):
        simulate(build_schedule("dualpipev", 4, 8), Costs.uniform(4, 1, 1, 1))


def test_profile_file_round_trips(tmp_path):
    costs = costs_from_config(_paper(), 16)
    costs.fb_overlap = 0.9
    path = tmp_path / "profile.json"
    costs.write_profile(path)
    again = Costs.from_profile(path)
    assert again.f == costs.f and again.b == costs.b and again.w == costs.w and again.act_bytes == costs.act_bytes
    assert again.fb_overlap == 0.9
    assert again.link_bandwidth == pytest.approx(costs.link_bandwidth)
    sched = build_schedule("dualpipev", 8, 32)
    assert simulate(sched, again).step_time == pytest.approx(simulate(sched, costs).step_time)


_STAGE = '{"format": "dualpipe-mhc-profile/1", "stages": [{"f": 1, "b": 1, "w": 0, "act_bytes": 0}]'


def test_bad_profile_names_the_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"format": "dualpipe-mhc-profile/1", "stages": [{"f": 1, "b": -1, "w": 0, "act_bytes": 0}]}')
    with pytest.raises(ValueError, match=r"stages\[0\]\.b=-1 is invalid"):
        Costs.from_profile(path)
    path.write_text('{"stages": []}')
    with pytest.raises(ValueError, match="format=None, expected 'dualpipe-mhc-profile/1'"):
        Costs.from_profile(path)


@pytest.mark.parametrize(
    "body, message",
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"format": "dualpipe-mhc-profile/1", "stages": [1]}', r"stages\[0\]=1 is invalid"),
        ('{"format": "dualpipe-mhc-profile/1", "stages": [{"f": true, "b": 0, "w": 0, "act_bytes": 0}]}',
         r"stages\[0\]\.f=True is invalid"),
        (_STAGE + ', "fb_overlap": "x"}', "fb_overlap='x' is invalid"),
        (_STAGE + ', "link": {"bandwidth_gbps": "x"}}', "link.bandwidth_gbps='x' is invalid"),
        (_STAGE + ', "link": [1]}', "link=\\[1\\] is invalid"),
        (_STAGE + ', "links": [{"src": 0, "dst": 1, "bandwidth_gbps": null}]}', r"links\[0\]\.bandwidth_gbps=None"),
        (_STAGE + ', "links": [{"src": "a", "dst": 1, "bandwidth_gbps": 1}]}', r"links\[0\] needs src, dst"),
    ],
)
def test_malformed_profile_is_a_value_error_naming_the_field(tmp_path, body, message):
    path = tmp_path / "p.json"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        Costs.from_profile(path)


def test_64_ranks_512_microbatches_dualpipe_simulates_in_under_2_s():
    sched = build_schedule("dualpipe", 64, 512)
    costs = Costs.uniform(64, 1.0, 1.0, 1.0, act_bytes=2e8, link_bandwidth=2e11, link_latency=3e-6)
    best = math.inf
    for _ in range(2):  # the best of two, so a busy neighbour on the shared box does not decide it
        start = time.perf_counter()
        simulate(sched, costs)
        best = min(best, time.perf_counter() - start)
    assert best < 2.0


def test_a_slow_pair_link_only_slows_its_pair(tmp_path):
    sched = build_schedule("1f1b", 4, 8)
    fast = Costs.uniform(4, 1.0, 1.0, 1.0, act_bytes=1e9, link_bandwidth=1e12)
    slow = Costs.uniform(4, 1.0, 1.0, 1.0, act_bytes=1e9, link_bandwidth=1e12)
    slow.pair_links[(1, 2)] = (1e9, 0.0)  # one second per activation from rank 1 to rank 2
    a, b = simulate(sched, fast), simulate(sched, slow)
    assert b.step_time > a.step_time
    assert b.comm_time[1] > a.comm_time[1] and b.comm_time[0] == pytest.approx(a.comm_time[0])
    path = tmp_path / "p.json"
    slow.write_profile(path)
    assert Costs.from_profile(path).pair_links == {(1, 2): (1e9, 0.0)}


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_exposed_communication_is_the_wait_an_instant_link_would_remove(name):
    # Exposed = start - (when every input's producer had finished), summed over actions: zero on an
    # instant link, never above the bubble, and counted over all of an F&B pair's inputs.
    sched = build_schedule(name, 4, 16)
    base = Costs.uniform(sched.num_stages, 1.0, 1.0, 0.5, act_bytes=1e9)
    instant = simulate(sched, base.with_link(math.inf, 0.0))
    assert instant.exposed_comm == [0.0] * sched.ranks
    slow = simulate(sched, base.with_link(2e9, 0.1))  # 0.6 s a message: same order as compute
    assert max(slow.exposed_comm) > 0
    assert all(0 <= e <= b + 1e-9 for e, b in zip(slow.exposed_comm, slow.bubble))
    assert slow.step_time > instant.step_time


@pytest.mark.parametrize("name, ranks, mb", [("1f1b", 3, 5), ("zb1p", 4, 6), ("dualpipe", 4, 10), ("dualpipev", 3, 7)])
def test_the_simulators_fast_keys_agree_with_the_ir_message_rule(name, ranks, mb):
    """The simulator compiles the IR's rule (Schedule.prerequisites / message_in / message_out)
    into int keys once per direction; decoded, they must give the IR's answer for every half."""
    from dualpipe_mhc.scheduler.simulate import _compile

    sched = build_schedule(name, ranks, mb)
    costs = Costs.uniform(sched.num_stages, 1.0, 1.0, 1.0, act_bytes=1.0)
    nkeys = 2 * sched.num_stages * mb

    def decode(key: int) -> tuple[str, int, int]:
        stage, micro = divmod(key // 2, mb)
        return ("B" if key % 2 else "F", stage, micro)

    for rank in range(ranks):
        for _dur, needs, outputs, action in _compile(sched, rank, costs, sched.deferred_weights(), mb, nkeys):
            halves = action.halves()
            want_needs, want_out = [], []
            for half in halves:
                message = sched.message_in(half)
                for need in sched.prerequisites(half):
                    want_needs.append((need, message is not None and need == message.key))
                if half.kind != "W":
                    sent = sched.message_out(half)
                    want_out.append(((half.kind, half.stage, half.microbatch), sent.dst if sent else -1))
            got_needs = [(decode(k % nkeys), k < nkeys) for k in needs]
            assert got_needs == want_needs, action
            assert [(decode(k), dst) for k, _bytes, dst in outputs] == want_out, action


def test_an_unsplit_backward_costs_full_b_and_a_split_one_b_plus_w():
    """A split can cost more than the whole (torch's W re-runs a custom autograd node B ran): 1F1B's B
    takes full_b, ZB1P's deferred B takes b and its W w; the profile file carries full_b."""
    base = Costs.uniform(4, f=1.0, b=1.0, w=1.0)
    dearer = Costs(base.f, base.b, base.w, base.act_bytes, full_b=[1.5] * 4)
    one_f_one_b, zb = build_schedule("1f1b", 4, 8), build_schedule("zb1p", 4, 8)
    assert simulate(one_f_one_b, dearer).step_time < simulate(one_f_one_b, base).step_time
    assert simulate(zb, dearer).step_time == simulate(zb, base).step_time
    again = Costs.from_profile(dearer.to_profile())
    assert again.full_b == [1.5] * 4 and Costs.from_profile(base.to_profile()).full_b == [2.0] * 4
