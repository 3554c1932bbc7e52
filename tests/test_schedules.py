"""Builders, the validator and explicit transfers (docs/DESIGN.md §5, issue 3)."""

from __future__ import annotations

import pytest

from dualpipe_mhc.scheduler import Action, Schedule, ScheduleError, add_comms, build_schedule, validate
from dualpipe_mhc.scheduler.builders import check_schedule_args

GRID = [(r, m) for r in (1, 2, 3, 4, 5, 8) for m in (1, 2, 3, 4, 7, 8, 10, 16, 17, 24)]


def _buildable(name: str, ranks: int, mb: int) -> bool:
    if name == "dualpipe":
        return ranks % 2 == 0 and mb % 2 == 0 and mb >= 2 * ranks
    if name == "dualpipev":
        return mb >= 2 * ranks  # any parity, as DeepSeek's and torch's DualPipeV
    return True


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_every_builder_passes_the_validator(name):
    built = 0
    for ranks, mb in GRID:
        if not _buildable(name, ranks, mb):
            with pytest.raises(ScheduleError):
                build_schedule(name, ranks, mb)
            continue
        sched = build_schedule(name, ranks, mb)
        report = validate(sched)
        with_comms = validate(add_comms(sched))
        assert with_comms.peak_inflight == report.peak_inflight
        built += 1
    assert built >= 10


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_each_microbatch_runs_once_per_stage(name):
    sched = build_schedule(name, 4, 12)
    for kind in ("F", "B"):
        seen = sorted((h.stage, h.microbatch) for a in sched for h in a.halves() if h.kind == kind)
        assert seen == sorted((s, m) for s in range(sched.num_stages) for m in range(sched.microbatches))
    weights = [(a.stage, a.microbatch) for a in sched if a.kind == "W"]
    assert len(weights) == len(set(weights))
    if name == "1f1b":
        assert not weights
    if name == "zb1p":
        assert len(weights) == sched.num_stages * sched.microbatches


def test_dualpipe_layout_follows_deepseek():
    sched = build_schedule("dualpipe", 4, 8)
    assert sched.chunks_of(1) == {0: 1, 1: 2}  # rank i holds stage i forward and P-1-i reverse
    assert sched.directions == [0] * 4 + [1] * 4
    # Rank 0: two warm-up forwards, F of both chunks, zero-bubble B/W/F, then the F&B pairs.
    assert sched.format().splitlines()[0] == (
        "rank 0: F0.c0 F1.c0 F2.c0 F4.c1 B4.c1 W4.c1 F5.c1 F3.c0&B5.c1 F6.c1&B0.c0 B6.c1 "
        "F7.c1&B1.c0 B7.c1 B2.c0 W2.c0 B3.c0 W3.c0"
    )
    v = build_schedule("dualpipev", 4, 8)
    assert v.num_stages == 8 and v.chunks_of(0) == {0: 0, 1: 7}


@pytest.mark.parametrize(
    "name, ranks, mb, needle",
    [
        ("dualpipe", 3, 8, "DualPipe needs an even number of ranks, got 3; use 1F1B, ZB1P or DualPipeV, or 4 ranks"),
        ("dualpipe", 4, 6, "use microbatches=8"),
        ("dualpipev", 4, 7, "DualPipeV needs a micro-batch count >= 2*ranks=8, got 7; use microbatches=8"),
        ("dualpipe", 4, 9, "DualPipe needs an even number of micro-batches >= 2*ranks=8, got 9; use microbatches=10"),
        ("1f1b", 4, 0, "at least 1 micro-batch"),
        ("gpipe", 4, 8, "unknown schedule 'gpipe'"),
    ],
)
def test_invalid_combinations_say_the_rule_and_the_fix(name, ranks, mb, needle):
    with pytest.raises(ScheduleError) as err:
        build_schedule(name, ranks, mb)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, ranks, mb, field",
    [("dualpipe", 3, 8, "ranks"), ("dualpipe", 4, 7, "microbatches"), ("dualpipev", 4, 7, "microbatches"),
     ("zb1p", 0, 4, "ranks"), ("1f1b", 2, 0, "microbatches")],
)
def test_the_rule_names_the_argument_it_refuses(name, ranks, mb, field):
    with pytest.raises(ScheduleError) as err:
        check_schedule_args(name, ranks, mb)
    assert err.value.field == field


def _torch_order(ops) -> list[tuple[str, int, int]]:
    """(kind, stage, microbatch) per compute op of one rank of torch's schedule; I = deferred-W backward."""
    return [
        (x.computation_type.value, x.stage_index, x.microbatch_index)
        for op in ops if op is not None for x in (op.sub_actions or [op])
    ]


def _our_order(sched: Schedule, rank: int) -> list[tuple[str, int, int]]:
    deferred = sched.deferred_weights()
    return [
        ("I" if h.kind == "B" and (h.stage, h.microbatch) in deferred else h.kind, h.stage, h.microbatch)
        for a in sched.actions[rank] for h in a.halves()
    ]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
def test_dualpipev_matches_torch_for_even_and_odd_counts(ranks):
    """Per rank, the F / I (input backward, W deferred) / B (full) / W order of torch's
    ScheduleDualPipeV (a port of DeepSeek's), for every count from 2P to 2P + 5."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    for mb in range(2 * ranks, 2 * ranks + 6):
        sched = build_schedule("dualpipev", ranks, mb)
        validate(add_comms(sched))
        ops = visualizer.get_schedule_ops("DualPipeV", ranks, mb, num_stages_per_rank=2)
        for rank in range(ranks):
            assert _our_order(sched, rank) == _torch_order(ops[rank]), (ranks, mb, rank)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_peak_inflight_matches_the_published_table(ranks):
    for name in ("1f1b", "zb1p"):
        peaks = validate(build_schedule(name, ranks, 3 * ranks)).peak_inflight
        assert peaks[0] == ranks and max(peaks) == ranks  # PP on the first rank, at most
    for name, pp in (("dualpipe", ranks), ("dualpipev", 2 * ranks)):
        peaks = validate(build_schedule(name, ranks, 4 * ranks)).peak_inflight
        assert max(peaks) == pp + 1, (name, peaks)


def test_validator_rejects_a_missing_receive():
    sched = add_comms(build_schedule("1f1b", 2, 2))
    sched.actions[1] = [a for a in sched.actions[1] if not (a.kind == "RECV_F" and a.microbatch == 1)]
    with pytest.raises(ScheduleError, match=r"SEND_F1\.s0\.c0@r0->r1 has no matching RECV_F on rank 1"):
        validate(sched)


def test_validator_rejects_b_before_f():
    sched = build_schedule("1f1b", 2, 2)
    acts = sched.actions[1]
    sched.actions[1] = [acts[1], acts[0], *acts[2:]]
    with pytest.raises(ScheduleError, match=r"B0\.s1\.c0@r1 comes before its F"):
        validate(sched)


def test_validator_rejects_a_cross_rank_wait_cycle():
    sched = build_schedule("1f1b", 2, 2)
    # rank 0 now waits for B0's gradient before sending F1; rank 1 waits for F1 before running B0.
    f0, f1, b0, b1 = sched.actions[0]
    sched.actions[0] = [f0, b0, f1, b1]
    sched.actions[1] = [a for a in sched.actions[1] if a.kind == "F"] + [a for a in sched.actions[1] if a.kind == "B"]
    with pytest.raises(ScheduleError, match=r"deadlock.*rank 0 at B0\.s0\.c0@r0.*rank 1 at F1\.s1\.c0@r1"):
        validate(sched)
    with pytest.raises(ScheduleError, match=r"deadlock.*RECV_B0\.s0\.c0@r0<-r1"):
        validate(add_comms(sched))


def test_validator_rejects_a_rank_waiting_on_itself():
    sched = build_schedule("dualpipev", 2, 4)
    acts = sched.actions[1]
    # On the V's turning rank, F0 of stage 2 needs F0 of stage 1 from the same rank.
    i = next(k for k, a in enumerate(acts) if a.kind == "F" and a.stage == 1 and a.microbatch == 0)
    j = next(k for k, a in enumerate(acts) if a.kind == "F" and a.stage == 2 and a.microbatch == 0)
    acts[i], acts[j] = acts[j], acts[i]
    with pytest.raises(ScheduleError, match=r"F0\.s2\.c1@r1 waits on itself"):
        validate(sched)


def test_validator_rejects_misplaced_and_missing_actions():
    sched = build_schedule("1f1b", 2, 2)
    sched.actions[0][0] = Action("F", 0, 1, 0, 0)
    with pytest.raises(ScheduleError, match=r"F0\.s1\.c0@r0: stage 1 of micro-batch 0 runs on rank 1"):
        validate(sched)
    sched = build_schedule("1f1b", 2, 2)
    sched.actions[1] = [a for a in sched.actions[1] if a.microbatch != 1]
    with pytest.raises(ScheduleError, match=r"F1\.s1\.c0@r1 is missing"):
        validate(sched)


def test_comms_pair_up_and_sit_around_their_compute():
    sched = add_comms(build_schedule("dualpipev", 2, 4))
    kinds = [a.kind for a in sched.actions[0]]
    assert kinds.count("SEND_F") == 4 and kinds.count("RECV_F") == 4  # stage 0 out, stage 3 in
    assert kinds.count("SEND_B") == 4 and kinds.count("RECV_B") == 4
    acts = sched.actions[0]
    for k, a in enumerate(acts):
        if a.kind == "RECV_F":  # the next compute action is the forward that consumes it
            nxt = next(x for x in acts[k:] if x.kind in ("F", "B", "W", "FB"))
            assert any(h.kind == "F" and h.stage == a.stage and h.microbatch == a.microbatch for h in nxt.halves())


def test_ir_round_trips_through_json():
    sched = add_comms(build_schedule("dualpipe", 4, 8))
    again = Schedule.from_dict(__import__("json").loads(sched.to_json()))
    assert again.actions == sched.actions and again.paths == sched.paths
    assert sched.deferred_weights() == again.deferred_weights()


def test_the_ir_message_rule_f_feeds_the_next_stage_b_the_previous():
    sched = build_schedule("dualpipev", 2, 4)  # stages 0, 1 on ranks 0, 1 (chunk 0); 2, 3 on ranks 1, 0 (chunk 1)
    f1 = Action("F", 1, 1, 0, 2)
    out = sched.message_out(f1)
    assert (out.key, out.src, out.dst, out.remote, out.consumer_stage) == (("F", 1, 2), 1, 1, False, 2)  # the V's turn
    f2 = Action("F", 1, 2, 1, 2)
    assert sched.message_in(f2) == out
    b2 = Action("B", 1, 2, 1, 2)
    assert sched.message_in(b2).key == ("B", 3, 2) and sched.message_in(b2).src == 0
    assert sched.prerequisites(b2) == [("F", 2, 2), ("B", 3, 2)]
    assert sched.prerequisites(Action("W", 1, 2, 1, 2)) == [("B", 2, 2)]
    assert sched.message_out(Action("F", 0, 3, 1, 0)) is None  # the last stage outputs the loss
    assert sched.message_in(Action("F", 0, 0, 0, 0)) is None and sched.message_out(Action("B", 0, 0, 0, 0)) is None
    for action in add_comms(sched):  # SEND/RECV actions and messages convert both ways
        if action.kind.startswith("SEND"):
            assert sched.send_action(sched.transfer_message(action)) == action
        elif action.kind.startswith("RECV"):
            assert sched.recv_action(sched.transfer_message(action)) == action
