import numpy as np
import pandas as pd

from models.features import FeatureVocab, hash_bucket, last_n_history


def test_hash_is_stable_and_in_range():
    h = hash_bucket(np.array([1, 2, 3, 10**12]), 7)
    assert h.tolist() == hash_bucket(np.array([1, 2, 3, 10**12]), 7).tolist()
    assert ((h >= 0) & (h < 7)).all()
    spread = np.bincount(hash_bucket(np.arange(10000), 16), minlength=16)
    assert spread.min() > 500  # roughly uniform


def test_last_n_history_newest_first():
    users = np.array([0, 1, 0, 0, 1])
    items = np.array([5, 6, 7, 8, 9])
    h = last_n_history(users, items, n_users=3, history_len=2)
    assert h.tolist() == [[9, 8], [10, 7], [0, 0]]  # item index + 1, newest first


def test_vocab_maps_unknown_and_cold_users_to_hashed_rows():
    users = pd.DataFrame(
        {
            "user_id": [10, 20, 30],
            "gender": ["F", "M", "F"],
            "age_bucket": ["18-24"] * 3,
            "activity": ["low"] * 3,
            "occupation": ["unknown"] * 3,
        }
    )
    items = pd.DataFrame({"item_id": [100, 200], "genre": ["a", "b"], "provider": ["x", "y"]})
    train = pd.DataFrame({"user_id": [10, 10, 20], "item_id": [100, 200, 100]})
    vocab = FeatureVocab.fit(
        users, items, train, n_hash_buckets=4, history_len=3, min_user_interactions=2
    )
    idx = vocab.user_index(np.array([10, 20, 999]))
    assert idx[0] == 0  # the only user with >= 2 interactions has its own row
    assert 1 <= idx[1] < 5 and 1 <= idx[2] < 5  # cold (20) and unknown (999) share hashed rows
    assert vocab.item_index(np.array([200, 300])).tolist() == [1, -1]
    cats = vocab.encode_user_cats(
        pd.DataFrame(
            {
                "gender": ["M", "Z"],
                "age_bucket": ["18-24"] * 2,
                "activity": ["low"] * 2,
                "occupation": ["unknown"] * 2,
            }
        )
    )
    assert cats[1, 0] == 0  # unseen category -> unknown code
