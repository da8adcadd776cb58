"""Search: where a value sits in a sorted list and which indices the binary search probed."""


def main(values: list[int], target: int) -> dict:
    lo, hi, probes = 0, len(values) - 1, []
    while lo <= hi:
        mid = (lo + hi) // 2
        probes.append(mid)
        if values[mid] == target:
            return {"index": mid, "probes": probes}
        if values[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return {"index": -1, "probes": probes}


def gen_input(rng):
    values = sorted(rng.sample(range(100), rng.randint(3, 12)))
    return {"values": values, "target": rng.choice(values + [rng.randint(0, 99)])}
