"""Print the project's requirements (pyproject.toml) for the given extras, one per line.

Used by docker/train.Dockerfile to install the dependencies in a layer of their own, before the code is
copied (so a code change does not reinstall torch): self-references such as "stage-trainer[liger]" are
expanded, torch is left out (installed first, from the index the build chose).

    python docker/pyproject-deps.py [pyproject.toml] --extras gpu,deepspeed
"""

import argparse
import re
import sys

import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    name = project["name"].lower()
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*\[([^\]]+)\]\s*", req)
            if m and m.group(1).lower().replace("_", "-") == name:
                for extra in m.group(2).split(","):
                    expand(extra.strip())
            elif req not in out:
                out.append(req)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            sys.exit(f"error: no extra {extra!r} in pyproject.toml (have: {', '.join(sorted(optional))})")
        seen.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        expand(extra)
    return [r for r in out if re.split(r"[\s=<>!~;\[]", r, maxsplit=1)[0].lower() != "torch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. gpu,deepspeed")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    sys.stdout.write("\n".join(requirements(project, extras)) + "\n")


if __name__ == "__main__":
    main()
