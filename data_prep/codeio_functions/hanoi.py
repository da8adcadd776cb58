"""Recursion: the moves that solve the Tower of Hanoi for n disks."""


def main(n: int, source: str = "A", target: str = "C", spare: str = "B") -> list[str]:
    if n == 0:
        return []
    return main(n - 1, source, spare, target) + [f"{source}->{target}"] + main(n - 1, spare, target, source)


INPUTS = [{"n": 1}, {"n": 2}, {"n": 3}]
