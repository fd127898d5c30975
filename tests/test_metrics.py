"""metrics.py on tiny fixtures whose scores are worked out by hand in the comments."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import metrics  # noqa: E402


def t(text):
    return text.split()


def test_bleu_multiple_references_clipping_and_closest_length():
    # every n-gram of "a b c" is in one of the references: p1 = 3/3, p2 = 2/2 (max_n 2) -> 100
    assert metrics.corpus_bleu([t("a b c")], [[t("a b d"), t("x b c")]], max_n=2) == pytest.approx(100.0)
    # ... but "a b c" itself is in none: p3 = 0 -> BLEU-4 = 0
    assert metrics.corpus_bleu([t("a b c")], [[t("a b d"), t("x b c")]]) == 0.0
    # "a" is clipped to its largest count in any one reference (2): p1 = 2/3
    assert metrics.corpus_bleu([t("a a a")], [[t("a b c"), t("a a x")]], max_n=1) == pytest.approx(200 / 3)
    # brevity: hyp of 2 tokens, references of 3 and 6 tokens -> r = 3 (closest): BP = exp(1 - 3/2)
    assert metrics.corpus_bleu([t("a b")], [[t("a b c"), t("a b c d e f")]], max_n=1) == pytest.approx(100 * math.exp(-0.5))
    # a tie in distance (2 from both 2 and 6) takes the shorter reference: r = 2 >= ... no penalty
    assert metrics.corpus_bleu([t("a b c d")], [[t("a b"), t("a b c d x y")]], max_n=1) == pytest.approx(100.0)
    # a single token list per hypothesis is one reference (train_translate's call)
    assert metrics.corpus_bleu([t("a b c d")], [t("a b c d")]) == pytest.approx(100.0)


def test_nist_information_weights_and_length_penalty():
    # ref "a b a": 3 words, a x2, b x1, bigrams "a b", "b a" once each. hyp = ref, n <= 2:
    # unigrams (2 log2(3/2) + log2(3/1)) / 3, bigrams (log2(2/1) + log2(1/1)) / 2
    expected = (2 * math.log2(1.5) + math.log2(3)) / 3 + 0.5
    assert metrics.corpus_nist([t("a b a")], [[t("a b a")]], max_n=2) == pytest.approx(expected)
    # hyp "a b": 2/3 of the reference length -> penalty exactly 0.5
    assert metrics.corpus_nist([t("a b")], [[t("a b a")]], max_n=1) == pytest.approx(0.5 * (math.log2(1.5) + math.log2(3)) / 2)
    # hyp "a": ratio 1/3 -> exp(-beta ln(1/3)^2), beta = ln 2 / ln(1.5)^2
    penalty = math.exp(math.log(0.5) * (math.log(1 / 3) / math.log(1.5)) ** 2)
    assert metrics.corpus_nist([t("a")], [[t("a b a")]], max_n=1) == pytest.approx(math.log2(1.5) * penalty)


def test_rouge_l():
    assert metrics.lcs_length(t("a b c d"), t("a c d x y")) == 3
    # P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    f = 2.44 * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    assert metrics.rouge_l([t("a b c d")], [[t("a c d x y")]]) == pytest.approx(100 * f)
    # P and R take their maxima over the references separately: P = 1 (2nd ref), R = 1 (1st)
    assert metrics.rouge_l([t("a b c d")], [[t("a b"), t("a b c d e f g h")]]) == pytest.approx(100.0)
    assert metrics.rouge_l([t("x")], [[t("a b")]]) == 0.0


def test_cider_d():
    # two sentences, every n-gram in one sentence's references: df = 1, idf = ln(2 / 1).
    # "c d" vs "c d": cosine 1 for n = 1, 2, 0 for n = 3, 4 -> 10 * 2 / 4 = 5
    # "a b" vs "a b" -> [1, 1, 0, 0]; vs "a b e" -> [2 / sqrt 6, 1 / sqrt 2, 0, 0] times the length
    # penalty exp(-(1 - 2)^2 / 72) (lengths counted in bigrams); mean over 2 references
    g = math.exp(-1 / 72)
    first = 10 * (2 + g * (2 / math.sqrt(6) + 1 / math.sqrt(2))) / 4 / 2
    score = metrics.cider_d([t("a b"), t("c d")], [[t("a b"), t("a b e")], [t("c d")]])
    assert score == pytest.approx((first + 5.0) / 2)
    # one sentence: idf = ln(1) = 0 everywhere -> 0
    assert metrics.cider_d([t("a b")], [[t("a b")]]) == 0.0


def test_e2e_scores_tokenizes_and_leaves_meteor_out():
    s = metrics.e2e_scores(["The Vaults is a pub."], [["the vaults is a pub .", "The Vaults: a pub."]])
    assert metrics.tokenize("The Vaults: £30, 5.5 stars.") == ["the", "vaults", ":", "£", "30", ",", "5.5", "stars", "."]
    assert s["BLEU"] == pytest.approx(100.0) and s["ROUGE-L"] == pytest.approx(100.0) and s["METEOR"] is None
