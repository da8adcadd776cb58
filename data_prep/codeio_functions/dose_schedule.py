"""Modular decomposition: a tapering dose schedule built by small helpers (step, clamp, format)."""


def _step(dose: float, fraction: float) -> float:
    return round(dose * (1 - fraction), 1)


def _clamp(dose: float, floor: float) -> float:
    return dose if dose >= floor else 0.0


def main(start_dose: float, fraction: float, floor: float, days: int) -> list[str]:
    schedule, dose = [], start_dose
    for day in range(1, days + 1):
        schedule.append(f"day {day}: {dose} mg")
        dose = _clamp(_step(dose, fraction), floor)
    return schedule


INPUTS = [
    {"start_dose": 40.0, "fraction": 0.25, "floor": 5.0, "days": 5},
    {"start_dose": 60.0, "fraction": 0.5, "floor": 10.0, "days": 4},
    {"start_dose": 20.0, "fraction": 0.1, "floor": 15.0, "days": 6},
]
