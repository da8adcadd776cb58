"""Recursion with memoisation: the n-th Fibonacci number and how many calls the recursion made."""


def main(n: int) -> dict:
    calls = 0
    memo = {}

    def fib(k):
        nonlocal calls
        calls += 1
        if k < 2:
            return k
        if k not in memo:
            memo[k] = fib(k - 1) + fib(k - 2)
        return memo[k]

    return {"value": fib(n), "calls": calls}


def gen_input(rng):
    return {"n": rng.randint(0, 30)}
