"""String transform: run-length encoding ("aaabcc" -> "a3b1c2")."""


def main(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] == text[i]:
            j += 1
        out.append(f"{text[i]}{j - i}")
        i = j
    return "".join(out)


def gen_input(rng):
    return {"text": "".join(rng.choice("aab") * rng.randint(1, 4) for _ in range(rng.randint(1, 5)))}
