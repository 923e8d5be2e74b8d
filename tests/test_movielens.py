"""MovieLens-100K from the recbole wheel: labels, chronological split, multi-hot genres, cardinalities, errors.

Checked against the raw text of the files inside the wheel. Skipped when the wheel cannot be downloaded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from torchrec_pss.datasets.movielens import (
    AGE_BOUNDS,
    MEMBER,
    SINGLE_FEATURES,
    SPARSE_FEATURES,
    MovieLens100K,
    fetch_wheel,
    load_movielens_100k,
)


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return fetch_wheel()
    except RuntimeError as error:
        pytest.skip(f"recbole wheel not downloadable (no network?): {error}")


@pytest.fixture(scope="module")
def data(wheel: Path) -> MovieLens100K:
    return load_movielens_100k(wheel=wheel)


def raw_lines(wheel: Path, kind: str) -> list[str]:
    """Every line of ``ml-100k.<kind>`` (index 0 = line 1, the header)."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(MEMBER.format(kind)).decode("utf-8").split("\n")


def test_labels_are_rating_at_least_4_on_raw_rows(data: MovieLens100K, wheel: Path) -> None:
    lines = raw_lines(wheel, "inter")
    for split in (data.train, data.test):
        for row in range(0, len(split), 997):
            user, item, rating, timestamp = lines[int(split.line_numbers[row]) - 1].split("\t")
            assert split.labels[row].item() == float(int(rating) >= 4)
            assert split.ratings[row].item() == float(rating)
            assert split.timestamps[row].item() == int(timestamp)
            assert data.vocabularies["user_id"][split.ids[row, 0]] == user
            assert data.vocabularies["item_id"][split.ids[row, 1]] == item
    ratings = torch.cat([data.train.ratings, data.test.ratings])
    labels = torch.cat([data.train.labels, data.test.labels])
    assert torch.equal(labels, (ratings >= 4).float())
    assert int(labels.sum()) == sum(line.split("\t")[2] in ("4", "5") for line in lines[1:] if line)


def test_chronological_split_keeps_every_interaction_once(data: MovieLens100K, wheel: Path) -> None:
    data_lines = [line for line in raw_lines(wheel, "inter")[1:] if line]
    assert (len(data.train), len(data.test)) == (90_000, 10_000) and len(data_lines) == 100_000
    for split in (data.train, data.test):
        assert bool((split.timestamps[1:] >= split.timestamps[:-1]).all())
    assert data.train.timestamps.max() <= data.test.timestamps.min()
    lines = torch.cat([data.train.line_numbers, data.test.line_numbers])
    assert torch.equal(torch.sort(lines).values, torch.arange(2, 100_002))
    cut = sorted(int(line.split("\t")[3]) for line in data_lines)[90_000]
    assert data.test.timestamps.min().item() == cut


def test_genres_are_multi_hot_bags_of_the_item_classes(data: MovieLens100K, wheel: Path) -> None:
    classes = {line.split("\t")[0]: line.split("\t")[3].split() for line in raw_lines(wheel, "item")[1:] if line}
    rows = torch.arange(0, 512)
    batch = data.test.batch(rows)
    genre = batch.sparse_features["genre"]
    items = [data.vocabularies["item_id"][i] for i in data.test.ids[rows, 1]]
    assert genre.lengths().tolist() == [len(classes[item]) for item in items]
    assert max(genre.lengths().tolist()) > 1
    names = [data.vocabularies["genre"][g] for g in genre.values()]
    assert names == [name for item in items for name in classes[item]]
    for feature in SINGLE_FEATURES:
        assert batch.sparse_features[feature].lengths().tolist() == [1] * rows.numel()
    assert batch.sparse_features.keys() == list(SPARSE_FEATURES)
    assert batch.dense_features.shape == (512, 2) and torch.equal(batch.labels, data.test.labels[rows])


def test_cardinalities_match_the_raw_files(data: MovieLens100K, wheel: Path) -> None:
    users = [line.split("\t") for line in raw_lines(wheel, "user")[1:] if line]
    items = [line.split("\t") for line in raw_lines(wheel, "item")[1:] if line]
    expected = {
        "user_id": len(users), "item_id": len(items), "age": len(AGE_BOUNDS) + 1,
        "gender": len({u[2] for u in users}), "occupation": len({u[3] for u in users}),
        "zip_code": len({u[4] for u in users}), "release_year": len({i[2] for i in items}),
        "genre": len({g for i in items for g in i[3].split()}),
    }
    assert data.cardinalities == expected
    assert (expected["user_id"], expected["item_id"], expected["gender"], expected["genre"]) == (943, 1682, 2, 19)
    for split in (data.train, data.test):
        assert bool((split.ids >= 0).all())
        assert bool((split.ids < torch.tensor([expected[f] for f in SINGLE_FEATURES])).all())
    ages = {u[0]: int(u[1]) for u in users}
    row = 123
    user = data.vocabularies["user_id"][data.train.ids[row, 0]]
    assert data.train.ids[row, 2].item() == sum(ages[user] >= bound for bound in AGE_BOUNDS)
    assert data.train.dense[row, 0].item() == pytest.approx(ages[user] / 100)


def _wheel_with(tmp_path: Path, source: Path, kind: str, lines: list[str]) -> Path:
    """A copy of the ml-100k files in a zip whose ``ml-100k.<kind>`` is ``lines``."""
    path = tmp_path / f"bad-{kind}.whl"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as out:
        for other in ("inter", "user", "item"):
            text = "\n".join(lines) if other == kind else archive.read(MEMBER.format(other)).decode("utf-8")
            out.writestr(MEMBER.format(other), text)
    return path


def test_malformed_rows_name_file_and_line(wheel: Path, tmp_path: Path) -> None:
    inter = raw_lines(wheel, "inter")[:5]
    bad_rating = inter[:3] + ["196\t242\tgreat\t881250949"] + inter[3:]
    with pytest.raises(ValueError, match=r"ml-100k\.inter:4: rating is not a number"):
        load_movielens_100k(wheel=_wheel_with(tmp_path, wheel, "inter", bad_rating))
    short = inter[:2] + ["196\t242\t3"]
    with pytest.raises(ValueError, match=r"ml-100k\.inter:3: expected 4 tab-separated fields"):
        load_movielens_100k(wheel=_wheel_with(tmp_path, wheel, "inter", short))
    unknown_user = inter[:2] + ["99999\t242\t3\t881250949"]
    with pytest.raises(ValueError, match=r"ml-100k\.inter:3: user_id '99999' is not in ml-100k\.user"):
        load_movielens_100k(wheel=_wheel_with(tmp_path, wheel, "inter", unknown_user))
    user = raw_lines(wheel, "user")
    with pytest.raises(ValueError, match=r"ml-100k\.user:1: header must be"):
        load_movielens_100k(wheel=_wheel_with(tmp_path, wheel, "user", ["user_id:token\tage:float"] + user[1:]))
    with pytest.raises(ValueError, match=r"ml-100k\.user:3: duplicate user_id '1'"):
        load_movielens_100k(wheel=_wheel_with(tmp_path, wheel, "user", user[:2] + user[1:]))
