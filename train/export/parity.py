"""Parity checks: logits of fixed and held-out texts, compared between two ways of running a model
(base + adapter vs merged; transformers vs llama.cpp)."""

from __future__ import annotations

# Fixed parity texts beside the stage's own held-out prompts: Korean and English, special tokens included.
PARITY_TEXTS = [
    "45세 남성이 갑작스러운 흉통과 호흡곤란을 호소합니다. 가장 가능성 높은 진단은 무엇입니까?",
    "A 58-year-old woman presents with polyuria and polydipsia. What is the most likely diagnosis?",
    "다음 문장을 영어로 번역하세요: 환자는 어제부터 열이 났습니다.",
]


def token_logits(model, token_lists: list[list[int]]):
    """Float32 logits of each token sequence (one at a time: no padding to get in the way), on CPU."""
    import torch

    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0].float().cpu()
            for ids in token_lists
        ]


def text_logits(model, tokenizer, texts: list[str], max_tokens: int = 128):
    return token_logits(model, [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts])


def compare_logits(reference, candidate) -> dict:
    """Max |difference|, its size relative to the largest |logit|, and how often the argmax agrees."""
    import torch

    diff = max(float((a - b).abs().max()) for a, b in zip(reference, candidate, strict=True))
    scale = max(float(a.abs().max()) for a in reference)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(reference, candidate, strict=True)])
    return {
        "max_abs_diff": round(diff, 6),
        "max_abs_logit": round(scale, 4),
        "relative_diff": round(diff / max(scale, 1e-9), 6),
        "argmax_agreement": round(float(agree.mean()), 4),
    }
