"""List transform: merge overlapping appointment intervals (sort, then sweep)."""


def main(intervals: list[list[int]]) -> list[list[int]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def gen_input(rng):
    out = []
    for _ in range(rng.randint(1, 5)):
        a = rng.randint(0, 20)
        out.append([a, a + rng.randint(1, 6)])
    return {"intervals": out}
