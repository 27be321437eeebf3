"""Task loaders on the real shared data: counts from MANIFEST.md, offline splits, labels."""

from __future__ import annotations

import pytest

from skimbench.data import FileLog
from skimbench.errors import DataError
from skimbench.tasks import EXTRACTIVE_QA, REGRESSION, TASKS, get_task, load_task_data

# (train, eval) sizes from shared/data/MANIFEST.md and the offline splits of DESIGN 9.
EXPECTED = {
    "cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
    "rte": (2490, 277), "wnli": (635, 71), "qnli": (4370, 1093), "mnli": (9815, 9832),
    "imdb": (25000, 25000), "20news": (11314, 7532), "agnews": (6080, 1520),
    "hatexplain": (15383, 1924),
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_local_classification_data(shared_data, key):
    task = get_task(key)
    data = load_task_data(task, shared_data, FileLog())
    assert (len(data.train), len(data.eval)) == EXPECTED[key]
    assert data.source == "local"
    for example in data.train[:50] + data.eval[:50]:
        assert example.text
        if task.kind == REGRESSION:
            assert 0.0 <= example.label <= 5.0
        else:
            assert 0 <= example.label < task.num_labels
    if key in ("mrpc", "rte", "qnli", "mnli", "stsb", "wnli"):
        assert all(e.text_pair for e in data.eval[:50])


def test_every_class_occurs(shared_data):
    for key in ("mnli", "hatexplain", "agnews", "20news"):
        data = load_task_data(get_task(key), shared_data, FileLog())
        assert {e.label for e in data.eval} == set(range(get_task(key).num_labels))


def test_offline_splits_are_deterministic_and_disjoint(shared_data):
    first = load_task_data(get_task("qnli"), shared_data, FileLog())
    again = load_task_data(get_task("qnli"), shared_data, FileLog())
    assert [e.id for e in first.eval] == [e.id for e in again.eval]
    assert not {e.id for e in first.train} & {e.id for e in first.eval}
    assert "offline" in first.split and "80/20" in first.split


@pytest.mark.parametrize("key,train_articles,questions", [("squad", 38, 10570),
                                                         ("squad_v2", 28, 11873)])
def test_squad_offline_article_split(shared_data, key, train_articles, questions):
    data = load_task_data(get_task(key), shared_data, FileLog())
    assert len(data.train) + len(data.eval) == questions
    assert f"articles 1-{train_articles} train" in data.split
    assert not {e.id for e in data.train} & {e.id for e in data.eval}
    if key == "squad_v2":
        assert any(not e.answers for e in data.eval) and any(e.answers for e in data.eval)


def test_data_sha256_matches_the_manifest(shared_data):
    log = FileLog()
    load_task_data(get_task("sst2"), shared_data, log)
    digests = {path.split("/data/")[-1]: sha for path, sha in log.sha256.items()}
    assert digests["glue/SST-2/dev.tsv.gz"] == (
        "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0")


def test_no_local_data_and_no_hub_is_one_clear_error(tmp_path):
    for key in ("qqp", "yelp", "dbpedia"):
        with pytest.raises(DataError, match=f"task {key}: no local data .* expected"):
            load_task_data(TASKS[key], tmp_path, FileLog())


def test_every_task_is_complete():
    for task in TASKS.values():
        assert task.main_metric in task.metrics and task.max_length > 0
        assert task.kind == EXTRACTIVE_QA or task.num_labels >= 1
