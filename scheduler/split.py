"""How many layers each pipeline stage holds: the one split the model, the simulator and the
runtime all use, so a simulated stage is the stage that runs.

    stage_layers(56, 8, head_cost=1.6, embed_cost=0.02)   # balanced: [7, 7, 7, 7, 7, 7, 8, 6]

Costs are in layer-equivalents (one transformer layer's F + B + W = 1). ``even`` gives sizes
differing by at most one, larger first. ``balanced`` takes fewer layers on the stage that also
carries the embedding (stage 0) or the vocabulary head (the last), so that the stage times
``count + edge cost`` differ as little as whole layers allow: it minimises the slowest stage
first (the pipeline's step follows it), then the spread between slowest and fastest.
"""

from __future__ import annotations

SPLIT_MODES = ("even", "balanced")


def stage_layers(
    layers: int, stages: int, head_cost: float = 0.0, embed_cost: float = 0.0, mode: str = "balanced"
) -> list[int]:
    """Layers per stage, contiguous in path order, each stage at least one layer."""
    if not 1 <= stages <= layers:
        raise ValueError(f"cannot split {layers} layers into {stages} stages; use model.layers>={stages} or fewer ranks")
    if mode not in SPLIT_MODES:
        raise ValueError(f"model.split={mode!r} is unknown; use one of {list(SPLIT_MODES)}")
    if head_cost < 0 or embed_cost < 0:
        raise ValueError(f"head_cost={head_cost}, embed_cost={embed_cost}: edge costs are layer-equivalents >= 0")
    even = _even(layers, stages)
    if mode == "even" or stages == 1:
        return even
    best, best_key = even, _key(even, head_cost, embed_cost)
    # Only the two edge stages carry extra cost, so the middle ones split their rest evenly;
    # search the edge sizes (O(layers^2), a few thousand candidates at most).
    for first in range(1, layers - stages + 2):
        # Every middle stage keeps at least one layer; two stages leave no middle at all.
        lasts = [layers - first] if stages == 2 else range(1, layers - first - (stages - 2) + 1)
        for last in lasts:
            rest = layers - first - last
            counts = [first, last] if stages == 2 else [first, *_even(rest, stages - 2), last]
            key = _key(counts, head_cost, embed_cost)
            if key < best_key:
                best, best_key = counts, key
    return best


def stage_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` global layer ranges of consecutive stages holding ``counts`` layers."""
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def _even(layers: int, stages: int) -> list[int]:
    base, extra = divmod(layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def _key(counts: list[int], head_cost: float, embed_cost: float) -> tuple[float, float, int]:
    times = list(map(float, counts))
    times[0] += embed_cost
    times[-1] += head_cost
    slowest, fastest = max(times), min(times)
    # Rounded so float noise in the edge costs cannot flip a tie; the last entry prefers the
    # even split's shape (fewest layers moved) among equals.
    moved = sum(abs(a - b) for a, b in zip(counts, _even(sum(counts), len(counts))))
    return round(slowest, 9), round(slowest - fastest, 9), moved
