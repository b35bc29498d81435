"""Deterministic synthetic interactions: users and items with latent factors, features that reveal them noisily,
and interactions sampled from a softmax over latent dot products, rated 1-5.

Users belong to taste segments and items to genres (cluster centres in latent space), so ids, categorical
features and dense profiles all carry signal a model can learn and recall@K has a meaning. Same seed, same arrays.
"""

from __future__ import annotations

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.example.data.interactions import Interactions

AGE_BUCKETS = 7  # as MovieLens: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
OCCUPATIONS = 21
GENRES = 19
# Share of each rating 1..5 in MovieLens-100K; synthetic ratings follow it so rating >= 4 is ~55 % positive.
RATING_SHARES = (0.06, 0.11, 0.27, 0.34, 0.22)


def generate(
    seed: int = 0,
    num_users: int = 2000,
    num_items: int = 1000,
    latent_dim: int = 16,
    mean_interactions: int = 30,
    segments: int = 12,
    profile_dim: int = 8,
    sharpness: float = 8.0,
) -> Interactions:
    """Generate the dataset.

    seed: the only source of randomness. num_users / num_items: table sizes. latent_dim: width of the true taste
    vectors. mean_interactions: average events per user (each user has at least 5, at most num_items // 2).
    segments: user taste clusters (items cluster into GENRES). profile_dim: width of the dense profiles.
    sharpness: scale of the latent dot product in the sampling softmax (higher = more predictable users).
    """
    if num_users < 2 or num_items < 10 or latent_dim < 1 or mean_interactions < 1 or profile_dim < 1:
        raise DcncError("synthetic dataset: needs num_users >= 2, num_items >= 10 and positive sizes")
    rng = np.random.default_rng(seed)

    user_latent, user_segment = _clustered(rng, num_users, segments, latent_dim)
    item_latent, item_cluster = _clustered(rng, num_items, GENRES, latent_dim)
    popularity = rng.normal(0.0, 0.5, num_items)  # item bias: some items are watched by everyone

    # Sample each user's items without replacement from softmax(sharpness * u.v + popularity): Gumbel top-k.
    affinity = user_latent @ item_latent.T
    logits = sharpness * affinity + popularity
    perturbed = logits + rng.gumbel(size=logits.shape)
    counts = np.clip(rng.poisson(mean_interactions, num_users), 5, num_items // 2)
    ranked = np.argsort(-perturbed, axis=1, kind="stable")
    taken = np.arange(num_items)[None, :] < counts[:, None]
    user = np.repeat(np.arange(num_users), counts)
    item = ranked[taken]

    # Ratings: how much the user likes what they watched, plus noise, cut at MovieLens' rating shares.
    liking = affinity[user, item] + rng.normal(0.0, 0.15, len(user))
    cuts = np.quantile(liking, np.cumsum(RATING_SHARES)[:-1])
    rating = (1 + np.searchsorted(cuts, liking)).astype(np.float32)
    timestamp = rng.permutation(len(user)).astype(np.int64)

    user_features = {
        "user_id": np.arange(num_users, dtype=np.int64),
        "user_age": _noisy_bucket(rng, user_latent, AGE_BUCKETS),
        "user_occupation": _noisy_label(rng, user_segment % OCCUPATIONS, OCCUPATIONS, keep=0.7),
        "user_profile": _profile(rng, user_latent, profile_dim),
    }
    item_features = {
        "item_id": np.arange(num_items, dtype=np.int64),
        "item_genre": _noisy_label(rng, item_cluster, GENRES, keep=0.8),
        "item_profile": _profile(rng, item_latent, profile_dim),
    }
    cardinalities = {
        "user_id": num_users,
        "user_age": AGE_BUCKETS,
        "user_occupation": OCCUPATIONS,
        "item_id": num_items,
        "item_genre": GENRES,
    }
    return Interactions(
        name="synthetic",
        user_features=user_features,
        item_features=item_features,
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        rating=rating,
        timestamp=timestamp,
        cardinalities=cardinalities,
        latent={"user": user_latent.astype(np.float32), "item": item_latent.astype(np.float32)},
    ).check()


def _clustered(rng: np.random.Generator, rows: int, clusters: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm latent vectors scattered around `clusters` random centres, and each row's cluster."""
    centres = rng.normal(size=(clusters, dim))
    label = rng.integers(0, clusters, rows)
    latent = centres[label] + 0.6 * rng.normal(size=(rows, dim))
    return latent / np.linalg.norm(latent, axis=1, keepdims=True), label


def _noisy_label(rng: np.random.Generator, label: np.ndarray, classes: int, keep: float) -> np.ndarray:
    """The true label with probability `keep`, otherwise a uniformly random one."""
    replace = rng.random(len(label)) >= keep
    return np.where(replace, rng.integers(0, classes, len(label)), label).astype(np.int64)


def _noisy_bucket(rng: np.random.Generator, latent: np.ndarray, buckets: int) -> np.ndarray:
    """Equal-frequency buckets of a noisy projection of the latent vector (age tracks taste, loosely)."""
    projection = latent @ rng.normal(size=latent.shape[1]) + 0.5 * rng.normal(size=len(latent))
    cuts = np.quantile(projection, np.linspace(0, 1, buckets + 1)[1:-1])
    return np.searchsorted(cuts, projection).astype(np.int64)


def _profile(rng: np.random.Generator, latent: np.ndarray, dim: int) -> np.ndarray:
    """A standardised noisy linear view of the latent vector."""
    view = latent @ rng.normal(size=(latent.shape[1], dim)) + 0.5 * rng.normal(size=(len(latent), dim))
    return ((view - view.mean(0)) / view.std(0)).astype(np.float32)
