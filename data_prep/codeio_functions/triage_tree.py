"""A decision tree: emergency triage level from vital signs (branching on thresholds)."""


def main(heart_rate: int, systolic_bp: int, spo2: int, conscious: bool) -> str:
    if not conscious:
        return "level 1: resuscitation"
    if spo2 < 90 or systolic_bp < 90:
        return "level 2: emergent"
    if heart_rate > 120:
        return "level 2: emergent" if systolic_bp < 100 else "level 3: urgent"
    if heart_rate < 50:
        return "level 3: urgent"
    return "level 4: less urgent" if spo2 < 95 else "level 5: non-urgent"


def gen_input(rng):
    return {
        "heart_rate": rng.randint(40, 150),
        "systolic_bp": rng.randint(70, 180),
        "spo2": rng.randint(85, 100),
        "conscious": rng.random() > 0.1,
    }
