"""
Text-generation metrics in plain Python/numpy, as the E2E NLG Challenge scores them
(paper Table 1 and 6): corpus BLEU-4 and NIST-5 with multiple references (the e2e-metrics
package's mteval-style BLEU and NIST), ROUGE-L and CIDEr-D (coco-caption's definitions).
METEOR is left out: it needs Java and WordNet.

Every function takes tokenized text: a hypothesis is a list of tokens, its references a
list of such lists (corpus_bleu also accepts one token list per hypothesis). tokenize()
is the normalisation used for E2E here: lowercased, punctuation split off. Scores from
the official scripts can differ slightly (they run their own tokenizers).
"""

import math
import re
from collections import Counter

import numpy as np


def tokenize(text):
    """Lowercase; words, numbers and single punctuation marks (mteval-v13a-like)."""
    return re.findall(r"\w+(?:[.,']\w+)*|[^\w\s]", text.lower())


def ngram_counts(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def max_reference_counts(refs, n):
    """Each n-gram's largest count in any one reference: what clips a hypothesis's count."""
    most = Counter()
    for ref in refs:
        most |= ngram_counts(ref, n)  # | keeps the larger count of each n-gram
    return most


def as_reference_lists(references):
    """Each entry a list of references: a single token list becomes [it]."""
    return [refs if refs and isinstance(refs[0], (list, tuple)) else [refs] for refs in references]


def check_lengths(hypotheses, references):
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


# -----------------------------------------------------------------------------
# BLEU (Papineni et al. 2002)


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU in [0, 100]: n-gram counts clipped by their largest count in any reference
    and summed over the corpus, the geometric mean of the precisions p_1..p_max_n, times the
    brevity penalty exp(1 - r / c) when the hypotheses (c tokens) are shorter than the
    references (r: per sentence the reference length closest to the hypothesis's, the
    shorter on a tie). 0 if some p_n is 0 (no smoothing). references[i]: one token list or
    a list of them."""
    check_lengths(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, as_reference_lists(references)):
        c += len(hyp)
        r += min((len(ref) for ref in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            h, most = ngram_counts(hyp, n), max_reference_counts(refs, n)
            matches[n - 1] += sum(min(k, most[gram]) for gram, k in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if c == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = min(0.0, 1.0 - r / c)
    return 100.0 * math.exp(log_precision + brevity)


# -----------------------------------------------------------------------------
# NIST (Doddington 2002), as in e2e-metrics' pymteval

NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # the penalty is 0.5 at 2/3 of the reference length


def corpus_nist(hypotheses, references, max_n=5):
    """Sum over n = 1..max_n of (information of the matched n-grams) / (hypothesis n-grams),
    times exp(-beta log^2(min(1, c / r))) with r the summed mean reference length.
    Information of w_1..w_n = log2(count(w_1..w_{n-1}) / count(w_1..w_n)) over all references
    (for n = 1 the numerator is the number of reference words); matches clipped as in BLEU."""
    check_lengths(hypotheses, references)
    ref_counts = Counter()  # every n-gram of every reference, n = 1..max_n; () counts words
    hits, hyp_ngrams = [Counter() for _ in range(max_n)], [0] * max_n
    hyp_len = ref_len = 0.0
    for hyp, refs in zip(hypotheses, references):
        for n in range(1, max_n + 1):
            most = max_reference_counts(refs, n)
            for gram, k in ngram_counts(hyp, n).items():
                if most[gram]:
                    hits[n - 1][gram] += min(k, most[gram])
            hyp_ngrams[n - 1] += max(len(hyp) - n + 1, 0)
            for ref in refs:
                ref_counts.update(ngram_counts(ref, n))
        ref_counts[()] += sum(len(ref) for ref in refs)
        hyp_len += len(hyp)
        ref_len += sum(len(ref) for ref in refs) / len(refs)
    score = 0.0
    for n in range(max_n):
        info = sum(k * math.log2(ref_counts[gram[:-1]] / ref_counts[gram]) for gram, k in hits[n].items())
        score += info / max(hyp_ngrams[n], 1)
    ratio = hyp_len / ref_len if ref_len else 0.0
    penalty = 1.0 if ratio >= 1 else (0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2))
    return score * penalty


# -----------------------------------------------------------------------------
# ROUGE-L (Lin 2004), coco-caption's multi-reference form


def lcs_length(a, b):
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses, references, beta=1.2):
    """Mean over sentences, in [0, 100], of F = (1 + beta^2) P R / (R + beta^2 P) with
    P = max over references of LCS / len(hyp), R = max over references of LCS / len(ref)."""
    check_lengths(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        lcs = [lcs_length(hyp, ref) for ref in refs]
        p = max((l / len(hyp) if hyp else 0.0) for l in lcs)
        r = max((l / len(ref) if ref else 0.0) for l, ref in zip(lcs, refs))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return 100.0 * float(np.mean(scores)) if scores else 0.0


# -----------------------------------------------------------------------------
# CIDEr-D (Vedantam et al. 2015), coco-caption's cider_scorer


def cider_d(hypotheses, references, max_n=4, sigma=6.0):
    """Mean over sentences of 10 x mean over n = 1..4 of the mean over references of
    sum_g min(v_hyp(g), v_ref(g)) v_ref(g) / (|v_hyp| |v_ref|) x exp(-(l_hyp - l_ref)^2 / (2 sigma^2)),
    v(g) = count(g) x log(N / max(1, df(g))), df(g) the number of sentences (of N) with g in
    some reference. As in coco-caption the length l is the number of *bigrams* (a quirk
    kept for comparability)."""
    check_lengths(hypotheses, references)
    if not hypotheses:
        return 0.0
    df = Counter()
    for refs in references:
        df.update({g for ref in refs for n in range(1, max_n + 1) for g in ngram_counts(ref, n)})
    log_n = math.log(len(references))

    def vector(tokens):
        vec, norm = [dict() for _ in range(max_n)], np.zeros(max_n)
        for n in range(1, max_n + 1):
            for g, tf in ngram_counts(tokens, n).items():
                vec[n - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
                norm[n - 1] += vec[n - 1][g] ** 2
        return vec, np.sqrt(norm), max(len(tokens) - 1, 0)

    scores = []
    for hyp, refs in zip(hypotheses, references):
        vh, nh, lh = vector(hyp)
        total = np.zeros(max_n)
        for ref in refs:
            vr, nr, lr = vector(ref)
            for n in range(max_n):
                val = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                if nh[n] and nr[n]:
                    val /= nh[n] * nr[n]
                total[n] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(10.0 * total.mean() / len(refs))
    return float(np.mean(scores))


def e2e_scores(hypotheses, references):
    """BLEU, NIST, ROUGE-L and CIDEr of hypothesis strings against lists of reference
    strings, tokenized by tokenize(). METEOR is not computed (it needs Java and WordNet)."""
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    return {"BLEU": corpus_bleu(hyps, refs), "NIST": corpus_nist(hyps, refs), "METEOR": None,
            "ROUGE-L": rouge_l(hyps, refs), "CIDEr": cider_d(hyps, refs)}
