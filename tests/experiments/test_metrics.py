"""app.metrics against numbers computed by hand (worked in the comments), plus the edge cases
the service meets: empty groups, absent classes, ties, identical arms. No database needed."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from app.experiments import metrics
from app.experiments.metrics import (
    classification_metrics,
    correctness_string,
    group_differences,
    group_metrics,
    holm_adjust,
    macro_auroc,
    paired_bootstrap_difference,
    parse_correctness,
    proportion_ci,
    summarize,
    top_k_correct,
)
from app.fitzpatrick import FITZPATRICK_GROUPS

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal

# Three classes, six images. Predicted = argmax, ties to the lower index; top-2 likewise.
#   row  true  probs              predicted  top1  top2 (by -prob, stable)
#   0    0     [0.7, 0.2, 0.1]    0          yes   {0, 1}  yes
#   1    0     [0.3, 0.3, 0.4]    2          no    {2, 0}  yes
#   2    1     [0.3, 0.3, 0.4]    2          no    {2, 0}  no  (the 0/1 tie goes to class 0)
#   3    1     [0.2, 0.5, 0.3]    1          yes   {1, 2}  yes
#   4    1     [0.4, 0.4, 0.2]    0 (tie)    no    {0, 1}  yes
#   5    2     [0.1, 0.3, 0.6]    2          yes   {2, 1}  yes
CLASSES = ["eczema", "melanoma", "psoriasis"]
Y = np.array([0, 0, 1, 1, 1, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.3, 0.4],
        [0.3, 0.3, 0.4],
        [0.2, 0.5, 0.3],
        [0.4, 0.4, 0.2],
        [0.1, 0.3, 0.6],
    ]
)


def interval(ci: tuple[float, float] | None) -> tuple[float, float]:
    assert ci is not None
    return ci


def assert_json_ready(value: Any, where: str = "result") -> None:
    """Only plain python types all the way down (np.float64 subclasses float, so check exactly)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, where
            assert_json_ready(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_json_ready(item, f"{where}[{index}]")
    else:
        assert value is None or type(value) in (int, float, str), (where, type(value))


# --- proportion_ci ---------------------------------------------------------------------------


def test_normal_ci_of_7_of_10():
    # p = 0.7, p(1-p)/n = 0.021, half = 1.959964 * sqrt(0.021) = 0.284026 -> [0.415974, 0.984026]
    low, high = interval(proportion_ci(successes=7, n=10, method="normal"))
    assert low == pytest.approx(0.7 - Z95 * math.sqrt(0.021), abs=1e-12)
    assert (low, high) == pytest.approx((0.41597, 0.98403), abs=1e-5)


def test_wilson_ci_of_7_of_10():
    # z^2 = 3.841459; 1 + z^2/n = 1.3841459
    # center = (0.7 + 3.841459/20) / 1.3841459 = 0.892073 / 1.3841459 = 0.644494
    # half = z / 1.3841459 * sqrt(0.021 + 3.841459/400) = 1.416006 * 0.174939 = 0.247715
    # -> [0.396778, 0.892209]
    low, high = interval(proportion_ci(successes=7, n=10, method="wilson"))
    assert (low, high) == pytest.approx((0.396778, 0.892209), abs=1e-5)
    assert proportion_ci(successes=7, n=10) == (low, high)  # wilson is the default


def test_ci_level_changes_width():
    # At 90% z = 1.644854: normal half = 1.644854 * sqrt(0.021) = 0.238362
    low, high = interval(proportion_ci(successes=7, n=10, method="normal", level=0.90))
    assert (low, high) == pytest.approx((0.7 - 0.238362, 0.7 + 0.238362), abs=1e-5)


def test_ci_edges_and_clipping():
    # Wald collapses at p = 0 and p = 1; Wilson does not.
    assert proportion_ci(successes=0, n=5, method="normal") == (0.0, 0.0)
    assert proportion_ci(successes=5, n=5, method="normal") == (1.0, 1.0)
    # Wilson at 0/5: upper = 2 * (z^2/10) / (1 + z^2/5) = 0.768292 / 1.768292 = 0.434482
    low, high = interval(proportion_ci(successes=0, n=5, method="wilson"))
    assert low == 0.0
    assert high == pytest.approx(0.434482, abs=1e-5)
    # Wald at 1/2 reaches past [0, 1] (0.5 +- 0.692952) and is clipped.
    assert proportion_ci(successes=1, n=2, method="normal") == (0.0, 1.0)


def test_ci_of_nothing_is_none():
    assert proportion_ci(successes=0, n=0) is None
    assert proportion_ci(successes=0, n=0, method="normal") is None


def test_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        proportion_ci(successes=1, n=2, method="exact")
    with pytest.raises(ValueError, match="method"):
        proportion_ci(successes=0, n=0, method="clopper")
    with pytest.raises(ValueError, match="successes"):
        proportion_ci(successes=3, n=2)
    with pytest.raises(ValueError, match="level"):
        proportion_ci(successes=1, n=2, level=95)


# --- top_k_correct ---------------------------------------------------------------------------


def test_top_k_correct_by_hand():
    assert top_k_correct(y_true=Y, probs=PROBS, k=1).tolist() == [1, 0, 0, 1, 0, 1]
    # k = 2: only row 2 misses (its 0/1 tie goes to class 0, and it is class 1)
    assert top_k_correct(y_true=Y, probs=PROBS, k=2).tolist() == [1, 1, 0, 1, 1, 1]
    assert top_k_correct(y_true=Y, probs=PROBS, k=1).dtype == bool


def test_top_k_with_k_at_least_classes_is_all_true():
    assert top_k_correct(y_true=Y, probs=PROBS, k=3).all()
    assert top_k_correct(y_true=Y, probs=PROBS, k=10).all()


def test_top_k_tie_goes_to_lower_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25]] * 4)
    # every class ties: the top 2 are classes 0 and 1
    assert top_k_correct(y_true=np.arange(4), probs=probs, k=2).tolist() == [1, 1, 0, 0]


def test_top_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k"):
        top_k_correct(y_true=Y, probs=PROBS, k=0)
    with pytest.raises(ValueError, match="y_true"):
        top_k_correct(y_true=np.array([0, 3]), probs=PROBS[:2], k=1)
    with pytest.raises(ValueError, match="probs"):
        top_k_correct(y_true=Y, probs=PROBS[:5], k=1)


# --- macro_auroc -----------------------------------------------------------------------------


def binary(scores: list[float]) -> np.ndarray:
    """Two-class probs whose class-1 column is `scores`: both one-vs-rest AUROCs are equal."""
    s = np.asarray(scores)
    return np.stack([1.0 - s, s], axis=1)


def test_auroc_perfect_reversed_and_tied():
    labels = np.array([0, 0, 1, 1])
    assert macro_auroc(y_true=labels, probs=binary([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert macro_auroc(y_true=labels, probs=binary([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert macro_auroc(y_true=labels, probs=binary([0.5, 0.5, 0.5, 0.5])) == 0.5


def test_auroc_small_case_by_hand():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4:
    # 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3 of 4 pairs ordered -> 0.75
    probs = binary([0.1, 0.4, 0.35, 0.8])
    assert macro_auroc(y_true=np.array([0, 0, 1, 1]), probs=probs) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    # Positives 0.5, 0.7; negatives 0.5, 0.2: pairs (0.5,0.5) = 1/2, (0.5,0.2) = 1, 0.7 wins
    # both -> 3.5 / 4 = 0.875
    probs = binary([0.5, 0.2, 0.5, 0.7])
    assert macro_auroc(y_true=np.array([0, 0, 1, 1]), probs=probs) == pytest.approx(0.875)


def test_macro_auroc_of_the_fixture_by_hand():
    # class 0: positives 0.7, 0.3 vs negatives 0.3, 0.2, 0.4, 0.1
    #          0.7 wins 4; 0.3 ties 0.3 (1/2), beats 0.2 and 0.1 -> 2.5; 6.5/8 = 13/16
    # class 1: positives 0.3, 0.5, 0.4 vs negatives 0.2, 0.3, 0.3
    #          0.3 -> 1 + 1/2 + 1/2 = 2; 0.5 -> 3; 0.4 -> 3; 8/9
    # class 2: positive 0.6 beats all five negatives -> 1
    # macro = (13/16 + 8/9 + 1) / 3 = (117 + 128 + 144) / 432 = 389/432
    assert macro_auroc(y_true=Y, probs=PROBS) == pytest.approx(389 / 432)


def test_macro_auroc_skips_a_class_without_positives():
    # Classes 0 and 1 are separated perfectly (1.0 each); class 2 never occurs, so it is left
    # out rather than counted (as 0.5 it would give 0.8333).
    probs = np.array([[0.6, 0.1, 0.3], [0.5, 0.2, 0.3], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])
    assert macro_auroc(y_true=np.array([0, 0, 1, 1]), probs=probs) == 1.0


def test_macro_auroc_none_without_a_scorable_class():
    assert macro_auroc(y_true=np.array([1, 1]), probs=PROBS[:2]) is None
    assert macro_auroc(y_true=np.array([], dtype=int), probs=np.zeros((0, 3))) is None


def test_auroc_matches_the_pairwise_definition():
    # O(n^2) definition: P(score_pos > score_neg) + 1/2 P(equal), with many ties (rounded scores).
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=300)
    scores = np.round(rng.random(300) * 0.5 + labels * 0.2, 1)
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert macro_auroc(y_true=labels, probs=binary(scores.tolist())) == pytest.approx(expected)


# --- classification_metrics ------------------------------------------------------------------


def test_classification_metrics_by_hand():
    result = classification_metrics(y_true=Y, probs=PROBS, class_names=CLASSES)
    assert result["n"] == 6
    # top-1: rows 0, 3, 5 -> 3/6; Wald 0.5 +- 1.959964 * sqrt(0.25/6) = 0.5 +- 0.400076
    # Wilson: center 0.5 (p = 1/2 is symmetric), half = z/(1 + z^2/6) * sqrt(1/24 + z^2/144)
    #         = 1.194921 * 0.261426 = 0.312384
    assert result["top1"]["value"] == 0.5
    assert result["top1"]["correct"] == 3
    assert result["top1"]["ci_normal"] == pytest.approx([0.099924, 0.900076], abs=1e-5)
    assert result["top1"]["ci_wilson"] == pytest.approx([0.187616, 0.812384], abs=1e-5)
    # top-3 with three classes is every image
    assert result["top3"]["value"] == 1.0
    assert result["top3"]["correct"] == 6
    assert result["top3"]["ci_normal"] == [1.0, 1.0]
    # confusion (rows true, columns predicted):
    #   true 0: predicted 0 (row 0), 2 (row 1)          -> [1, 0, 1]
    #   true 1: predicted 2 (row 2), 1 (row 3), 0 (row 4) -> [1, 1, 1]
    #   true 2: predicted 2 (row 5)                     -> [0, 0, 1]
    assert result["confusion"] == [[1, 0, 1], [1, 1, 1], [0, 0, 1]]
    # recall = diagonal / row sum: 1/2, 1/3, 1/1; balanced = (1/2 + 1/3 + 1) / 3 = 11/18
    assert result["per_class_recall"] == pytest.approx(
        {"eczema": 0.5, "melanoma": 1 / 3, "psoriasis": 1.0}
    )
    assert result["per_class_support"] == {"eczema": 2, "melanoma": 3, "psoriasis": 1}
    assert result["balanced_accuracy"] == pytest.approx(11 / 18)
    assert result["macro_auroc"] == pytest.approx(389 / 432)
    assert_json_ready(result)
    json.dumps(result, allow_nan=False)


def test_top3_with_four_classes_by_hand():
    # row 0: true 3 ranked last of four -> top-3 miss; row 1: true 0 ranked last -> miss;
    # row 2: true 2 ranked second -> top-3 hit, top-1 miss. top-3 = 1/3, top-1 = 0.
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    result = classification_metrics(
        y_true=np.array([3, 0, 2]), probs=probs, class_names=["a", "b", "c", "d"]
    )
    assert result["top1"]["correct"] == 0
    assert result["top1"]["value"] == 0.0
    assert result["top3"]["correct"] == 1
    assert result["top3"]["value"] == pytest.approx(1 / 3)
    # class "b" has no true image: recall None, left out of balanced accuracy (recalls 0, 0, 0)
    assert result["per_class_recall"] == {"a": 0.0, "b": None, "c": 0.0, "d": 0.0}
    assert result["per_class_support"] == {"a": 1, "b": 0, "c": 1, "d": 1}
    assert result["balanced_accuracy"] == 0.0
    assert result["confusion"] == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]


def test_classification_metrics_of_no_images():
    result = classification_metrics(
        y_true=np.array([]), probs=np.zeros((0, 3)), class_names=CLASSES
    )
    empty_accuracy = {"value": None, "correct": 0, "ci_normal": None, "ci_wilson": None}
    assert result == {
        "n": 0,
        "top1": empty_accuracy,
        "top3": empty_accuracy,
        "balanced_accuracy": None,
        "macro_auroc": None,
        "per_class_recall": {"eczema": None, "melanoma": None, "psoriasis": None},
        "per_class_support": {"eczema": 0, "melanoma": 0, "psoriasis": 0},
        "confusion": [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    }
    assert_json_ready(result)


def test_classification_metrics_rejects_mismatched_names():
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics(y_true=Y, probs=PROBS, class_names=["a", "b"])
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics(y_true=Y, probs=PROBS, class_names=["a", "a", "b"])
    with pytest.raises(ValueError, match="integer"):
        classification_metrics(y_true=Y.astype(float), probs=PROBS, class_names=CLASSES)


# --- group_metrics ---------------------------------------------------------------------------

# Rows 0, 1 -> I-II; rows 2, 3, 5 -> III-IV; row 4 -> unknown; V-VI has no image.
GROUPS = ["I-II", "I-II", "III-IV", "III-IV", "unknown", "III-IV"]


def test_group_metrics_by_hand():
    result = group_metrics(y_true=Y, probs=PROBS, groups=GROUPS, class_names=CLASSES)
    groups = result["groups"]
    assert list(groups) == list(FITZPATRICK_GROUPS)
    assert [groups[g]["n"] for g in FITZPATRICK_GROUPS] == [2, 3, 0, 1]

    # I-II: rows 0 (hit), 1 (miss), both class 0 -> top1 1/2, balanced = recall(0) = 1/2;
    # AUROC: class 0 has no negative, 1 and 2 no positive -> None
    assert groups["I-II"]["top1"]["value"] == 0.5
    assert groups["I-II"]["top3"]["value"] == 1.0
    assert groups["I-II"]["balanced_accuracy"] == 0.5
    assert groups["I-II"]["macro_auroc"] is None
    assert groups["I-II"]["confusion"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]

    # III-IV: rows 2 (miss), 3 (hit), 5 (hit) -> 2/3; recall(1) = 1/2, recall(2) = 1 -> 3/4;
    # AUROC class 1: positives 0.3, 0.5 vs negative 0.3 -> (1/2 + 1)/2 = 3/4;
    #       class 2: positive 0.6 vs 0.4, 0.3 -> 1; class 0 absent -> macro 7/8
    assert groups["III-IV"]["top1"]["value"] == pytest.approx(2 / 3)
    assert groups["III-IV"]["balanced_accuracy"] == 0.75
    assert groups["III-IV"]["macro_auroc"] == 0.875
    assert groups["III-IV"]["per_class_recall"] == {
        "eczema": None,
        "melanoma": 0.5,
        "psoriasis": 1.0,
    }

    # V-VI: no image -> every value None
    assert groups["V-VI"]["top1"] == {
        "value": None,
        "correct": 0,
        "ci_normal": None,
        "ci_wilson": None,
    }
    assert groups["V-VI"]["balanced_accuracy"] is None
    assert groups["V-VI"]["macro_auroc"] is None

    # unknown: row 4 (class 1, predicted 0) -> 0
    assert groups["unknown"]["top1"]["value"] == 0.0

    # Gaps over the skin-tone groups with images (I-II, III-IV); "unknown" (top-1 of 0) is not a
    # skin tone and does not widen them.
    gap = result["gap"]
    assert gap["top1"]["value"] == pytest.approx(2 / 3 - 1 / 2)
    assert (gap["top1"]["best"], gap["top1"]["worst"]) == ("III-IV", "I-II")
    assert gap["balanced_accuracy"] == {"value": 0.25, "best": "III-IV", "worst": "I-II"}
    # equal values: a zero gap, ties going to the earlier group
    assert gap["top3"] == {"value": 0.0, "best": "I-II", "worst": "I-II"}
    # only III-IV has an AUROC: no gap
    assert gap["macro_auroc"] == {"value": None, "best": None, "worst": None}
    assert_json_ready(result)


def test_group_gap_needs_two_groups():
    result = group_metrics(
        y_true=Y, probs=PROBS, groups=["V-VI"] * 5 + ["unknown"], class_names=CLASSES
    )
    assert result["groups"]["V-VI"]["n"] == 5
    for metric in ("top1", "top3", "balanced_accuracy", "macro_auroc"):
        assert result["gap"][metric] == {"value": None, "best": None, "worst": None}


def test_group_metrics_rejects_unknown_labels_and_lengths():
    with pytest.raises(ValueError, match="groups"):
        group_metrics(y_true=Y, probs=PROBS, groups=["V-Vl"] * 6, class_names=CLASSES)
    with pytest.raises(ValueError, match="groups"):
        group_metrics(y_true=Y, probs=PROBS, groups=GROUPS[:5], class_names=CLASSES)


# --- summarize -------------------------------------------------------------------------------


def test_summarize_ignores_none():
    # mean of 0.5, 0.7, 0.9 = 0.7; sd = sqrt((0.04 + 0 + 0.04) / 2) = 0.2
    result = summarize([0.5, None, 0.7, 0.9])
    assert result["mean"] == pytest.approx(0.7)
    assert result["sd"] == pytest.approx(0.2)
    assert result["n"] == 3
    assert result["values"] == [0.5, None, 0.7, 0.9]
    assert_json_ready(result)


def test_summarize_few_values():
    assert summarize([0.5]) == {"mean": 0.5, "sd": None, "n": 1, "values": [0.5]}
    assert summarize([None, None]) == {"mean": None, "sd": None, "n": 0, "values": [None, None]}
    assert summarize([]) == {"mean": None, "sd": None, "n": 0, "values": []}
    assert_json_ready(summarize([np.float64(0.25), np.float64(0.75)]))


# --- paired_bootstrap_difference -------------------------------------------------------------


def test_bootstrap_identical_arms():
    # The same noisy correctness in both arms: every resample's difference is exactly 0, which
    # an unpaired bootstrap (resampling each arm on its own) would not give.
    rng = np.random.default_rng(1)
    runs = rng.random((3, 200)) < 0.6
    result = paired_bootstrap_difference(treated=runs, control=runs.copy(), resamples=500)
    assert result["difference"] == 0.0
    assert result["ci"] == [0.0, 0.0]
    assert result["p_value"] == 1.0
    assert result["n_images"] == 200
    assert (result["seeds_treated"], result["seeds_control"]) == (3, 3)


def test_bootstrap_all_correct_against_all_wrong():
    treated = np.ones((2, 50), dtype=bool)
    control = np.zeros((4, 50), dtype=bool)
    result = paired_bootstrap_difference(treated=treated, control=control, resamples=300)
    assert result == {
        "difference": 1.0,
        "ci": [1.0, 1.0],
        "resamples": 300,
        "level": 0.95,
        "n_images": 50,
        "seeds_treated": 2,
        "seeds_control": 4,
        "p_value": 0.0,
    }
    assert_json_ready(result)


def test_bootstrap_difference_by_hand():
    # treated: (3 + 1)/8 = 1/2; control: 1/4 -> difference 1/4.
    # Per image: treated means [1, 1/2, 0, 1/2], control [1, 0, 0, 0] -> [0, 1/2, 0, 1/2].
    # A resample is a mean of four of these, so it lies in {0, 1/8, ..., 1/2}.
    treated = np.array([[1, 1, 0, 1], [1, 0, 0, 0]])
    control = np.array([[1, 0, 0, 0]])
    result = paired_bootstrap_difference(treated=treated, control=control, resamples=4000)
    assert result["difference"] == 0.25
    low, high = result["ci"]
    assert 0.0 <= low < 0.25 < high <= 0.5
    # P(resample = 0) = P(all four draws hit a 0 image) = (1/2)^4 = 1/16 -> p ~ 2/16 = 0.125
    assert result["p_value"] == pytest.approx(0.125, abs=0.03)


def test_bootstrap_single_image_has_no_spread():
    result = paired_bootstrap_difference(
        treated=np.array([[1], [0]]), control=np.array([[0], [0]]), resamples=50
    )
    assert result["difference"] == 0.5
    assert result["ci"] == [0.5, 0.5]


def test_bootstrap_in_blocks_equals_one_block(monkeypatch):
    # A large test set is resampled in blocks (bounded memory); a small one in one cached
    # block. Both draw the same resamples from the seed, so they agree exactly.
    rng = np.random.default_rng(5)
    treated, control = rng.random((5, 300)) < 0.7, rng.random((4, 300)) < 0.6
    whole = paired_bootstrap_difference(treated=treated, control=control, seed=11)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 1000)  # 3 resamples a block
    blocked = paired_bootstrap_difference(treated=treated, control=control, seed=11)
    assert blocked == whole
    assert 0 < whole["ci"][0] < whole["difference"] < whole["ci"][1]


def test_bootstrap_counts_are_shared_not_changed():
    # The report compares many settings on the same test images: the resampling is drawn
    # once and reused, and one comparison cannot alter the next.
    first = paired_bootstrap_difference(
        treated=np.array([[1, 0, 1, 1]]), control=np.array([[0, 0, 1, 0]]), resamples=100
    )
    paired_bootstrap_difference(
        treated=np.array([[0, 0, 0, 1]]), control=np.array([[1, 1, 1, 1]]), resamples=100
    )
    again = paired_bootstrap_difference(
        treated=np.array([[1, 0, 1, 1]]), control=np.array([[0, 0, 1, 0]]), resamples=100
    )
    assert first == again
    assert first["difference"] == 0.5


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(3)
    treated, control = rng.random((5, 300)) < 0.7, rng.random((5, 300)) < 0.6
    first = paired_bootstrap_difference(treated=treated, control=control, seed=11)
    again = paired_bootstrap_difference(treated=treated, control=control, seed=11)
    other = paired_bootstrap_difference(treated=treated, control=control, seed=12)
    assert first == again
    assert first["ci"] != other["ci"]
    assert first["difference"] == other["difference"]
    assert first["ci"][0] < first["difference"] < first["ci"][1]


def test_bootstrap_level_narrows_the_interval():
    rng = np.random.default_rng(4)
    treated, control = rng.random((2, 400)) < 0.7, rng.random((2, 400)) < 0.6
    wide = paired_bootstrap_difference(treated=treated, control=control, level=0.99)
    narrow = paired_bootstrap_difference(treated=treated, control=control, level=0.80)
    assert wide["ci"][0] < narrow["ci"][0] < narrow["ci"][1] < wide["ci"][1]


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap_difference(treated=np.ones((2, 5)), control=np.ones((2, 4)))
    with pytest.raises(ValueError, match="treated"):
        paired_bootstrap_difference(treated=np.ones((0, 5)), control=np.ones((2, 5)))
    with pytest.raises(ValueError, match="control"):
        paired_bootstrap_difference(treated=np.ones((2, 5)), control=np.ones((2, 0)))
    with pytest.raises(ValueError, match="correctness"):
        paired_bootstrap_difference(treated=np.full((2, 5), 0.7), control=np.ones((2, 5)))
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap_difference(treated=np.ones((2, 5)), control=np.ones((2, 5)), resamples=0)


# --- group_differences -----------------------------------------------------------------------

# Five test images: two I-II, two III-IV, one unknown, none V-VI; two seeds per arm.
DIFF_GROUPS = ["I-II", "I-II", "III-IV", "III-IV", "unknown"]
DIFF_TREATED = np.array([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0]])
DIFF_CONTROL = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]])


def test_group_differences_by_hand():
    result = group_differences(
        treated=DIFF_TREATED, control=DIFF_CONTROL, groups=DIFF_GROUPS, resamples=500
    )
    by_group = result["groups"]
    # I-II: treated (1 + 1 + 1 + 0) / 4 = 3/4, control (0 + 1 + 0 + 1) / 4 = 1/2 -> +1/4
    assert by_group["I-II"]["difference"] == pytest.approx(0.25)
    assert by_group["I-II"]["n_images"] == 2
    # III-IV: treated (0 + 1 + 0 + 1) / 4 = 1/2, control 1 -> -1/2
    assert by_group["III-IV"]["difference"] == pytest.approx(-0.5)
    # unknown: 1/2 and 1/2 -> 0; reported, but not a skin tone of the gap
    assert by_group["unknown"]["difference"] == 0.0
    assert by_group["V-VI"] is None  # no image
    for group in ("I-II", "III-IV", "unknown"):
        low, high = by_group[group]["ci"]
        assert low <= by_group[group]["difference"] <= high
    # gap per seed, best minus worst of I-II and III-IV:
    #   treated seed 1: 1 - 1/2 = 1/2, seed 2: 1/2 - 1/2 = 0 -> mean 1/4
    #   control seed 1: 1 - 1/2 = 1/2, seed 2: 1 - 1/2 = 1/2 -> mean 1/2
    gap = result["gap"]
    assert (gap["treated"], gap["control"]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert gap["difference"] == pytest.approx(-0.25)  # the gap narrowed by 25 points
    assert gap["groups"] == ["I-II", "III-IV"]
    assert gap["n_images"] == 4 and gap["resamples"] == 500
    assert -1.0 <= gap["ci"][0] <= gap["ci"][1] <= 1.0
    assert_json_ready(result)


def test_group_difference_gap_resamples_each_group_on_its_own_draws():
    # The vectorised gap against a loop over the same resamples: group i (of
    # FITZPATRICK_GROUPS) draws with seed + 1 + i, and its per-group difference uses those
    # draws too.
    rng = np.random.default_rng(5)
    groups = ["I-II"] * 7 + ["III-IV"] * 5 + ["V-VI"] * 3 + ["unknown"] * 2
    treated, control = rng.random((3, 17)) < 0.6, rng.random((2, 17)) < 0.5
    result = group_differences(
        treated=treated, control=control, groups=groups, resamples=300, seed=4
    )
    labels = np.array(groups)
    counts = {
        g: metrics._one_block_of_counts(int((labels == g).sum()), 300, 4 + 1 + i)
        for i, g in enumerate(FITZPATRICK_GROUPS[:3])
    }
    statistics = []
    for r in range(300):
        gaps = []
        for arm in (treated, control):
            per_seed = []
            for run in arm:
                accuracy = [counts[g][r] @ run[labels == g] / (labels == g).sum() for g in counts]
                per_seed.append(max(accuracy) - min(accuracy))
            gaps.append(np.mean(per_seed))
        statistics.append(gaps[0] - gaps[1])
    assert result["gap"]["ci"] == pytest.approx(list(np.quantile(statistics, [0.025, 0.975])))
    v_vi = treated[:, labels == "V-VI"].mean() - control[:, labels == "V-VI"].mean()
    assert result["groups"]["V-VI"]["difference"] == pytest.approx(v_vi)
    assert result["groups"]["V-VI"] == paired_bootstrap_difference(
        treated=treated[:, labels == "V-VI"], control=control[:, labels == "V-VI"],
        resamples=300, seed=4 + 1 + 2,
    )  # fmt: skip


def test_group_difference_constant_groups_have_no_spread():
    # I-II always right and III-IV always wrong with synthetic data, both always right without:
    # the gap grows from 0 to 1 in every resample.
    groups = ["I-II"] * 4 + ["III-IV"] * 3
    treated = np.array([[1, 1, 1, 1, 0, 0, 0]] * 2)
    control = np.ones((3, 7))
    gap = group_differences(treated=treated, control=control, groups=groups)["gap"]
    assert (gap["difference"], gap["ci"], gap["p_value"]) == (1.0, [1.0, 1.0], 0.0)


def test_group_difference_gap_needs_two_skin_tone_groups():
    result = group_differences(
        treated=np.ones((1, 4)), control=np.zeros((1, 4)), groups=["V-VI"] * 3 + ["unknown"]
    )
    assert result["gap"] is None
    assert result["groups"]["V-VI"]["difference"] == 1.0
    assert result["groups"]["I-II"] is None and result["groups"]["III-IV"] is None


def test_group_differences_rejects_bad_groups():
    with pytest.raises(ValueError, match="one entry per test image"):
        group_differences(treated=np.ones((1, 4)), control=np.ones((1, 4)), groups=["I-II"] * 3)
    with pytest.raises(ValueError, match="groups must be in"):
        group_differences(treated=np.ones((1, 2)), control=np.ones((1, 2)), groups=["V-Vl"] * 2)


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1 = 0.5); in the
    # given order, each adjusted value at least the one ranked before it
    assert holm_adjust([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # capped at 1; monotone when a larger p times a smaller factor comes out lower
    assert holm_adjust([0.4, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm_adjust([0.0, 0.0, 0.9]) == [0.0, 0.0, 0.9]
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]
    assert holm_adjust([]) == []


# --- correctness strings ---------------------------------------------------------------------


def test_correctness_string_round_trip():
    flags = np.array([True, False, True, True, False])
    assert correctness_string(flags) == "10110"
    assert parse_correctness("10110").tolist() == flags.tolist()
    assert parse_correctness("10110").dtype == bool
    assert correctness_string(np.array([1, 0, 0])) == "100"
    assert correctness_string(np.array([], dtype=bool)) == ""
    assert parse_correctness("").shape == (0,)
    many = np.random.default_rng(6).random(5000) < 0.5
    assert np.array_equal(parse_correctness(correctness_string(many)), many)


def test_correctness_string_rejects_bad_input():
    with pytest.raises(ValueError):
        parse_correctness("10x1")
    with pytest.raises(ValueError):
        parse_correctness("1é")
    with pytest.raises(ValueError):
        correctness_string(np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError):
        correctness_string(np.array([0.5, 1.0]))
