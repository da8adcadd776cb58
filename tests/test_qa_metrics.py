"""Clean-up rules, KorQuAD-style metrics on hand-computed Korean cases, multiple choice, voting."""

from __future__ import annotations

import pytest

from train.evaluation.qa_metrics import (
    CleanupRules,
    aggregate,
    char_f1,
    clean_answer,
    contains_reference,
    exact_match,
    extract_choice,
    normalize_answer,
    score_example,
    vote,
)


def test_korquad_normalization_and_exact_match():
    assert normalize_answer(" 《서울》 (대한민국) ") == "서울 대한민국"
    assert exact_match("'서울'", ["서울"]) == 1.0
    assert exact_match("서울.", ["서울"]) == 1.0
    assert exact_match("서울은", ["서울"]) == 0.0  # a particle is not the answer
    assert exact_match("Seoul", ["seoul"]) == 1.0
    assert exact_match("부산", ["서울", "부산"]) == 1.0  # any reference


def test_character_f1_by_hand():
    # 서울은 vs 서울: 2 common chars, precision 2/3, recall 1 -> 0.8
    assert char_f1("서울은", ["서울"]) == pytest.approx(0.8)
    # 대한민국 서울 (6 chars without the space) vs 서울특별시 (5): 2 common -> P 1/3, R 2/5 -> 4/11
    assert char_f1("대한민국 서울", ["서울특별시"]) == pytest.approx(4 / 11)
    assert char_f1("대한민국 서울", ["서울특별시", "서울"]) == pytest.approx(
        2 * (1 / 3) / (1 / 3 + 1)
    )  # best reference
    assert char_f1("부산", ["서울"]) == 0.0
    # repeated characters count as often as they occur in both: 하하하 vs 하하 -> P 2/3, R 1
    assert char_f1("하하하", ["하하"]) == pytest.approx(0.8)


def test_contains_reference_and_length():
    assert contains_reference("정답은 서울입니다.", ["서울"]) == 1.0
    assert contains_reference("정답은 서 울 입니다", ["서울"]) == 1.0  # spacing does not matter in Korean
    assert contains_reference("부산입니다", ["서울"]) == 0.0
    assert score_example("서울입니다", ["서울"])["length"] == 5


def test_multiple_choice_extraction_and_accuracy():
    choices = ["천식", "폐렴", "심근경색", "위궤양"]
    assert extract_choice("정답: B", choices) == "B"
    assert extract_choice("(C) 심근경색입니다", choices) == "C"
    assert extract_choice("The answer is D.", choices) == "D"
    assert extract_choice("심근경색이 가장 가능성이 높습니다", choices) == "C"  # by the choice's text
    assert extract_choice("천식 또는 폐렴", choices) is None  # two choices named: no pick
    assert extract_choice("E", choices) is None  # not an offered letter
    assert score_example("B", ["B"], choices)["accuracy"] == 1.0
    assert score_example("폐렴", ["폐렴"], choices)["accuracy"] == 1.0  # reference given as the text
    assert score_example("A", ["B"], choices)["accuracy"] == 0.0
    agg = aggregate([score_example("B", ["B"], choices), score_example("A", ["B"], choices)])
    assert agg["accuracy"] == 0.5 and agg["examples"] == 2


def test_cleanup_rules():
    raw = "<think>\n환자는 ... 생각해 보면\n</think>\n정답: 서울<｜end▁of▁sentence｜>"
    assert clean_answer(raw) == "서울"
    assert clean_answer("<think>\n아직 생각 중") == ""  # unclosed reasoning leaves no answer
    assert clean_answer("질문: 수도는?\n서울", prompt="질문: 수도는?") == "서울"  # prompt echo
    assert clean_answer("서울\n### Question:\n다음 질문") == "서울"  # the model starting a new turn
    assert clean_answer("  서울   특별시 \n") == "서울 특별시"
    keep_think = CleanupRules(strip_think=False)
    assert clean_answer("<think>x</think>서울", rules=keep_think) == "<think>x</think>서울"
    first = CleanupRules(first_line_only=True)
    assert clean_answer("<think></think>\n서울\n서울은 대한민국의 수도입니다.", rules=first) == "서울"
    assert clean_answer("Answer: Paris", rules=CleanupRules(answer_prefixes=[])) == "Answer: Paris"


def test_vote_majority_then_log_probability():
    answer, tally = vote([("서울", -1.0), ("서울.", -2.0), ("부산", -0.5)])
    assert answer == "서울" and tally == {"서울": 2, "부산": 1}  # normalized forms pooled, best-scored spelling kept
    assert vote([("서울", -3.0), ("부산", -1.0)])[0] == "부산"  # tie: higher total log-probability
    assert vote([("서울", -3.0), ("부산", -1.0), ("서울", -4.0)])[0] == "서울"  # majority beats log-prob
    assert vote([]) == ("", {})
