"""MovieLens-100K as a click task, read from the ``recbole`` wheel on PyPI (the data is never committed).

``recbole==1.2.1`` ships the dataset as RecBole "atomic files" inside its wheel
(``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``): tab-separated, UTF-8, one header line of
``name:type`` fields, a ``token_seq`` field holding space-separated tokens. :func:`fetch_wheel` downloads the
wheel once with ``pip download --no-deps`` into a cache directory and the files are read from the zip.

The task: label ``rating >= 4``; eight sparse features, each served by its own table:

- ``user_id``, ``item_id``: the row order of ``ml-100k.user`` / ``ml-100k.item``; one id per example;
- ``age``: bucket ``<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+``; one id;
- ``gender``, ``occupation``, ``zip_code``, ``release_year``: index among the sorted distinct tokens of
  the user / item file; one id;
- ``genre``: index among the sorted distinct genres (the item's ``class`` field); 0 or more ids (multi-hot),

and two dense features ``[age / 100, (release_year - 1900) / 100]`` (0 for a non-numeric year). The
split is chronological: interactions sorted by timestamp (ties kept in file order), the last
``test_fraction`` of them (10%) are the test set, so every test timestamp is >= every training one.
Vocabularies come from the user and item files, not from the interactions, so both splits share them.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
CACHE_ENV = "TORCHREC_PSS_RECBOLE_CACHE"
"""Environment variable overriding the default cache directory ``~/.cache/torchrec_pss/recbole``."""
DEFAULT_CACHE = Path("~/.cache/torchrec_pss/recbole")

SINGLE_FEATURES = ("user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year")
MULTI_FEATURE = "genre"
SPARSE_FEATURES = (*SINGLE_FEATURES, MULTI_FEATURE)
NUM_DENSE = 2
AGE_BOUNDS = (18, 25, 35, 45, 50, 56)
"""Upper-exclusive bounds of the age buckets (MovieLens-1M's): bucket = number of bounds <= age."""
HEADERS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "user": ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
    "item": ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
}


def fetch_wheel(cache_dir: str | Path | None = None) -> Path:
    """The ``recbole`` wheel in ``cache_dir`` (default ``$TORCHREC_PSS_RECBOLE_CACHE`` or
    ``~/.cache/torchrec_pss/recbole``), downloaded there with ``pip download --no-deps`` when absent.

    Raises ``RuntimeError`` with pip's message when the download fails (e.g. no network).
    """
    directory = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    wheel = directory / WHEEL_NAME
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"recbole=={RECBOLE_VERSION}", "-d", str(directory)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        message = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        raise RuntimeError(f"could not download {WHEEL_NAME} into {directory} ({' '.join(command)}): "
                           + " | ".join(message))
    return wheel


@dataclasses.dataclass(frozen=True)
class MovieLensSplit:
    """One split, one row per interaction, in chronological order.

    ``ids [N, 7]`` int64 (the single-valued features, in :data:`SINGLE_FEATURES` order), ``dense [N, 2]``
    float32, ``labels [N]`` float32 (``rating >= 4``), ``ratings [N]`` float32, ``timestamps [N]`` int64
    (Unix seconds), ``line_numbers [N]`` int64 (the row's line in ``ml-100k.inter``, header = line 1).
    Genres are per item: the genre ids of item ``i`` are ``genre_values[genre_offsets[i]:genre_offsets[i+1]]``.
    """

    ids: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    line_numbers: torch.Tensor
    genre_values: torch.Tensor
    genre_offsets: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, rows: torch.Tensor) -> Batch:
        """The TorchRec ``Batch`` of ``rows`` (int64 indices ``[B]``): dense ``[B, 2]``, a KJT with one id per
        example for each single-valued feature and the item's genres (0 or more ids) for ``genre``, labels ``[B]``."""
        items = self.ids[rows, SINGLE_FEATURES.index("item_id")]
        starts = self.genre_offsets[items]
        genre_lengths = self.genre_offsets[items + 1] - starts
        bag_starts = torch.cumsum(genre_lengths, 0) - genre_lengths
        positions = torch.arange(int(genre_lengths.sum())) - torch.repeat_interleave(bag_starts, genre_lengths)
        genres = self.genre_values[torch.repeat_interleave(starts, genre_lengths) + positions]
        sparse = KeyedJaggedTensor(
            keys=list(SPARSE_FEATURES),
            values=torch.cat([self.ids[rows].t().reshape(-1), genres]),
            lengths=torch.cat([torch.ones(len(SINGLE_FEATURES) * rows.numel(), dtype=torch.int64), genre_lengths]
                              ).to(torch.int32),
        )
        return Batch(dense_features=self.dense[rows], sparse_features=sparse, labels=self.labels[rows])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
                ) -> Iterator[Batch]:
        """One pass in ``batch_size`` batches: chronological order, or a permutation drawn from ``seed``."""
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size]
            if drop_last and rows.numel() < batch_size:
                return
            yield self.batch(rows)


@dataclasses.dataclass(frozen=True)
class MovieLens100K:
    """The two splits, the number of ids of every sparse feature (a table of that many rows serves it),
    the token of every id (``vocabularies[feature][id]``; ages are bucket names) and the wheel read."""

    train: MovieLensSplit
    test: MovieLensSplit
    cardinalities: dict[str, int]
    vocabularies: dict[str, list[str]]
    wheel: Path


def _rows(archive: zipfile.ZipFile, wheel: Path, kind: str) -> Iterator[tuple[str, int, list[str]]]:
    """``(where, line number, fields)`` of every data line of ``ml-100k.<kind>``; checks header and field count."""
    member = MEMBER.format(kind)
    where = f"{wheel}!{member}"
    try:
        text = archive.read(member).decode("utf-8")
    except KeyError:
        raise ValueError(f"{wheel}: has no {member}") from None
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if header != HEADERS[kind]:
        raise ValueError(f"{where}:1: header must be {HEADERS[kind]}, got {header}")
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{where}:{number}: expected {len(header)} tab-separated fields "
                             f"({', '.join(h.split(':')[0] for h in header)}), got {len(fields)}")
        yield f"{where}:{number}", number, fields


def _number(text: str, name: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {name} is not a number: {text!r}") from None


def _vocabulary(tokens: list[str]) -> dict[str, int]:
    return {token: index for index, token in enumerate(sorted(set(tokens)))}


def _index_of_ids(rows: list[tuple[str, int, list[str]]], name: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for where, _, fields in rows:
        if fields[0] in index:
            raise ValueError(f"{where}: duplicate {name} {fields[0]!r}")
        index[fields[0]] = len(index)
    return index


def load_movielens_100k(cache_dir: str | Path | None = None, wheel: str | Path | None = None,
                        test_fraction: float = 0.1) -> MovieLens100K:
    """MovieLens-100K from ``wheel`` (default: :func:`fetch_wheel` ``(cache_dir)``), split chronologically.

    Malformed rows (field count, non-numeric or out-of-range rating / age / timestamp, unknown or
    duplicate user and item ids) raise ``ValueError`` naming ``<wheel>!<member>:<line>``.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    wheel = Path(wheel) if wheel is not None else fetch_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        users = list(_rows(archive, wheel, "user"))
        items = list(_rows(archive, wheel, "item"))
        interactions = list(_rows(archive, wheel, "inter"))

    user_index, item_index = _index_of_ids(users, "user_id"), _index_of_ids(items, "item_id")
    vocab = {name: _vocabulary([fields[column] for _, _, fields in users])
             for name, column in (("gender", 2), ("occupation", 3), ("zip_code", 4))}
    vocab["release_year"] = _vocabulary([fields[2] for _, _, fields in items])
    vocab[MULTI_FEATURE] = _vocabulary([g for _, _, fields in items for g in fields[3].split()])

    user_features, user_age = [], []
    for where, _, (_, age_text, gender, occupation, zip_code) in users:
        age = _number(age_text, "age", where)
        if age != int(age) or not 0 < age < 150:
            raise ValueError(f"{where}: age must be a whole number of years in (0, 150), got {age_text!r}")
        user_age.append(age / 100)
        user_features.append([bisect.bisect_right(AGE_BOUNDS, age), vocab["gender"][gender],
                              vocab["occupation"][occupation], vocab["zip_code"][zip_code]])
    item_year, item_year_value, genre_values, genre_offsets = [], [], [], [0]
    for _, _, (_, _, year, genres) in items:
        item_year.append(vocab["release_year"][year])
        item_year_value.append((int(year) - 1900) / 100 if year.isdigit() else 0.0)
        genre_values.extend(vocab[MULTI_FEATURE][g] for g in genres.split())
        genre_offsets.append(len(genre_values))

    ids, dense, ratings, timestamps, line_numbers = [], [], [], [], []
    for where, number, (user, item, rating_text, time_text) in interactions:
        if user not in user_index:
            raise ValueError(f"{where}: user_id {user!r} is not in ml-100k.user")
        if item not in item_index:
            raise ValueError(f"{where}: item_id {item!r} is not in ml-100k.item")
        rating = _number(rating_text, "rating", where)
        if not 1 <= rating <= 5:
            raise ValueError(f"{where}: rating must be in [1, 5], got {rating_text!r}")
        timestamp = _number(time_text, "timestamp", where)
        if timestamp != int(timestamp) or timestamp < 0:
            raise ValueError(f"{where}: timestamp must be a non-negative whole number of seconds, got {time_text!r}")
        u, i = user_index[user], item_index[item]
        age_bucket, gender, occupation, zip_code = user_features[u]
        ids.append([u, i, age_bucket, gender, occupation, zip_code, item_year[i]])
        dense.append([user_age[u], item_year_value[i]])
        ratings.append(rating)
        timestamps.append(int(timestamp))
        line_numbers.append(number)
    if not ids:
        raise ValueError(f"{wheel}!{MEMBER.format('inter')}: no interactions")

    time = torch.tensor(timestamps, dtype=torch.int64)
    order = torch.sort(time, stable=True).indices
    rating_tensor = torch.tensor(ratings, dtype=torch.float32)[order]
    columns = {
        "ids": torch.tensor(ids, dtype=torch.int64)[order], "dense": torch.tensor(dense, dtype=torch.float32)[order],
        "labels": (rating_tensor >= 4).float(), "ratings": rating_tensor, "timestamps": time[order],
        "line_numbers": torch.tensor(line_numbers, dtype=torch.int64)[order],
    }
    genres = {"genre_values": torch.tensor(genre_values, dtype=torch.int64),
              "genre_offsets": torch.tensor(genre_offsets, dtype=torch.int64)}
    num_test = round(len(ids) * test_fraction)
    if not 0 < num_test < len(ids):
        raise ValueError(f"test_fraction {test_fraction} leaves an empty split of {len(ids)} interactions")
    cut = len(ids) - num_test
    train = MovieLensSplit(**{k: v[:cut] for k, v in columns.items()}, **genres)
    test = MovieLensSplit(**{k: v[cut:] for k, v in columns.items()}, **genres)

    age_names = [f"<{AGE_BOUNDS[0]}", *(f"{a}-{b - 1}" for a, b in itertools.pairwise(AGE_BOUNDS)),
                 f"{AGE_BOUNDS[-1]}+"]
    vocabularies = {"user_id": list(user_index), "item_id": list(item_index), "age": age_names,
                    **{name: list(tokens) for name, tokens in vocab.items()}}
    vocabularies = {name: vocabularies[name] for name in SPARSE_FEATURES}
    cardinalities = {name: len(tokens) for name, tokens in vocabularies.items()}
    return MovieLens100K(train=train, test=test, cardinalities=cardinalities, vocabularies=vocabularies, wheel=wheel)
