"""Tests for soft recall / precision / F1, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlmflow.core.metrics import Embed, Scores, image_scores, sentence_encoder, soft_prf
from vlmflow.core.models import packaged_minilm_path

SQRT_HALF = math.sqrt(0.5)

# Fixed unit vectors: cos(a, b) = 0, cos(a, ab) = cos(b, ab) = sqrt(1/2).
VECTORS = {
    "": [0.0, 0.0, 0.0, 1.0],
    "a": [1.0, 0.0, 0.0, 0.0],
    "b": [0.0, 1.0, 0.0, 0.0],
    "c": [0.0, 0.0, 1.0, 0.0],
    "ab": [SQRT_HALF, SQRT_HALF, 0.0, 0.0],
}


class FakeEmbed:
    """Returns the fixed vector of each label and records what it was asked to embed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.tensor([VECTORS[t] for t in texts])


def approx(scores: Scores, recall: float, precision: float, f1: float) -> None:
    assert scores.recall == pytest.approx(recall, abs=1e-6)
    assert scores.precision == pytest.approx(precision, abs=1e-6)
    assert scores.f1 == pytest.approx(f1, abs=1e-6)


def test_identical_lists_score_one() -> None:
    approx(soft_prf([["a", "b"], ["c"]], [["b", "a"], ["c"]], FakeEmbed()), 1, 1, 1)


def test_orthogonal_lists_score_zero_not_nan() -> None:
    scores = soft_prf([["a"]], [["b", "c"]], FakeEmbed())
    approx(scores, 0, 0, 0)
    assert not math.isnan(scores.f1)


def test_two_references_one_prediction_by_hand() -> None:
    # S = [[cos(a, a)], [cos(b, a)]] = [[1], [0]]:
    # R = mean of row maxima = (1 + 0) / 2, P = mean of column maxima = 1.
    approx(soft_prf([["a", "b"]], [["a"]], FakeEmbed()), 0.5, 1.0, 2 * 0.5 / 1.5)
    # S = [[s], [s]] with s = sqrt(1/2): R = s, P = s, F1 = s.
    approx(soft_prf([["a", "b"]], [["ab"]], FakeEmbed()), SQRT_HALF, SQRT_HALF, SQRT_HALF)


def test_image_scores_take_row_and_column_maxima() -> None:
    refs = torch.tensor([VECTORS["a"], VECTORS["b"], VECTORS["c"]])
    preds = torch.tensor([VECTORS["ab"], VECTORS["a"]])
    # Rows: a -> max(s, 1) = 1, b -> s, c -> 0; columns: ab -> s, a -> 1.
    recall = (1 + SQRT_HALF + 0) / 3
    precision = (SQRT_HALF + 1) / 2
    approx(
        image_scores(refs, preds),
        recall,
        precision,
        2 * recall * precision / (recall + precision),
    )


def test_f1_is_the_mean_of_per_image_f1s() -> None:
    # Image 1: identical lists -> R = P = F1 = 1.
    # Image 2: R = 1, P = 1/3 (a, b, c predicted, only a referenced) -> F1 = 1/2.
    scores = soft_prf([["a"], ["a"]], [["a"], ["a", "b", "c"]], FakeEmbed())
    approx(scores, 1.0, 2 / 3, (1 + 0.5) / 2)
    f1_of_means = 2 * 1.0 * (2 / 3) / (1 + 2 / 3)  # 0.8, not 0.75
    assert scores.f1 != pytest.approx(f1_of_means)


def test_empty_predictions_count_as_the_empty_label() -> None:
    embed = FakeEmbed()
    # "" is orthogonal to every label here, so an empty prediction scores 0.
    approx(soft_prf([["a"], ["b"]], [[], ["b"]], embed), 0.5, 0.5, 0.5)
    assert "" in embed.calls[0]
    # Each label is embedded once, however often it occurs.
    assert sorted(embed.calls[0]) == sorted(set(embed.calls[0]))
    assert len(embed.calls) == 1


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2 reference lists but 1 predictions"):
        soft_prf([["a"], ["b"]], [["a"]], FakeEmbed())
    with pytest.raises(ValueError, match="no images"):
        soft_prf([], [], FakeEmbed())
    with pytest.raises(ValueError, match="at least one reference"):
        soft_prf([[]], [["a"]], FakeEmbed())


# ---------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 encoder
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Embed:
    return sentence_encoder(packaged_minilm_path(), batch_size=2)


def test_real_encoder_gives_unit_vectors_that_rank_meaning(minilm: Embed) -> None:
    texts = ["dog", "puppy", "airplane", "red car", ""]
    vectors = minilm(texts)
    assert tuple(vectors.shape) == (5, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(5), atol=1e-5)
    dog, puppy, airplane = vectors[0], vectors[1], vectors[2]
    assert float(dog @ puppy) > float(dog @ airplane)
    # Batching (batch_size=2 here) and padding do not change a text's vector.
    alone = minilm(["red car"])[0]
    assert torch.allclose(alone, vectors[3], atol=1e-5)


def test_real_encoder_scores_synonyms_above_unrelated_labels(minilm: Embed) -> None:
    close = soft_prf([["dog", "grass"]], [["puppy", "lawn"]], minilm)
    far = soft_prf([["dog", "grass"]], [["airplane", "keyboard"]], minilm)
    assert close.f1 > far.f1
    exact = soft_prf([["dog", "grass"]], [["grass", "dog"]], minilm)
    approx(exact, 1, 1, 1)


def test_strict_scores_by_hand() -> None:
    from vlmflow.core.metrics import strict_label, strict_prf

    assert strict_label("  Red   Cars ") == "red car"
    # Image 1: {dog, green grass} vs {dog, grass, tree}: 1 hit, R 1/2, P 1/3, F1 0.4.
    # Image 2: no prediction: R = P = F1 = 0.
    scores = strict_prf([["Dogs", "green grass"], ["cat"]], [["dog", "grass", "tree"], []])
    approx(scores, (0.5 + 0) / 2, (1 / 3 + 0) / 2, (0.4 + 0) / 2)
    # Duplicates after normalising count once.
    approx(strict_prf([["car"]], [["cars", "Car"]]), 1, 1, 1)
    with pytest.raises(ValueError, match="at least one reference"):
        strict_prf([[]], [["a"]])
