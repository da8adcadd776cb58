"""State-space search: shortest path length on a grid with walls (breadth-first search), -1 if unreachable."""

from collections import deque


def main(grid: list[str], start: list[int], goal: list[int]) -> int:
    rows, cols = len(grid), len(grid[0])
    seen = {tuple(start)}
    queue = deque([(start[0], start[1], 0)])
    while queue:
        r, c, d = queue.popleft()
        if [r, c] == goal:
            return d
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nr, nc = r + dr, c + dc
            if 0 <= nr < rows and 0 <= nc < cols and grid[nr][nc] == "." and (nr, nc) not in seen:
                seen.add((nr, nc))
                queue.append((nr, nc, d + 1))
    return -1


def gen_input(rng):
    size = rng.randint(3, 6)
    grid = ["".join("#" if rng.random() < 0.25 else "." for _ in range(size)) for _ in range(size)]
    grid[0] = "." + grid[0][1:]
    grid[-1] = grid[-1][:-1] + "."
    return {"grid": grid, "start": [0, 0], "goal": [size - 1, size - 1]}
