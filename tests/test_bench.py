"""The benchmark's padding arithmetic on lengths whose answer is known (the figures themselves come from
`make bench`, never from timed tests)."""

from __future__ import annotations

from bench.train_bench import lengths, padding_efficiency


def test_padding_efficiency_on_known_lengths():
    lens = [10, 20, 30, 60]  # 120 real tokens
    result = padding_efficiency(lens, max_length=64, batch=4)
    assert result["pad_to_max_length"] == round(120 / (4 * 64), 3)
    assert result["pad_to_longest"] == round(120 / (4 * 60), 3)  # one batch of 4, longest 60
    assert result["packed_padding_free"] == 1.0  # measured through TRL's padding-free collator
    assert result["pack_fill"] == round(120 / (2 * 64), 3)  # best fit: [60] and [30, 20, 10]


def test_length_distributions_have_the_intended_shape():
    medical, korean = lengths("medical_reasoning", 5000, 4096), lengths("kocommercial", 5000, 4096)
    assert max(medical) <= 4096 and min(korean) >= 16
    assert sorted(medical)[2500] > 2 * sorted(korean)[2500]  # reasoning rows are much longer
    assert sorted(medical)[4950] > 4 * sorted(medical)[2500] / 2  # and have a long tail
