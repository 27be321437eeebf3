"""Shared fixtures: tiny local data sets in the shared/data layout, and the real data dir."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist every core runs a worker: torch's own threads would oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach a hub; an unset data dir must fail fast, not time out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def real_data_dir() -> Path | None:
    value = os.environ.get("SKIMBENCH_DATA_DIR") or str(REPO.parent / "shared" / "data")
    path = Path(value)
    return path.resolve() if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip("real data not found: set SKIMBENCH_DATA_DIR (e.g. ../shared/data)")
    return path


SENTENCES = [
    ("a charming and often affecting journey", 1), ("unflinchingly bleak and desperate", 0),
    ("the best film of the year", 1), ("a dull , lifeless mess", 0),
    ("warm , funny and wise", 1), ("it never finds its footing", 0),
    ("an absolute delight from start to finish", 1), ("tedious and overlong", 0),
]


def _write(path: Path, text: str, gz: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def _squad_article(index: int, name: str, city: str, km: int) -> dict:
    context = (f"The river {name} flows through the city of {city}. It is {km} kilometres long "
               "and was named by early settlers who arrived by boat.")
    qas = [(f"Which city does the {name} flow through?", city),
           (f"How long is the {name}?", f"{km} kilometres")]
    return {"title": f"Article{index}", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{index}-{k}", "question": q,
         "answers": [{"text": a, "answer_start": context.index(a)}]}
        for k, (q, a) in enumerate(qas)]}]}


RIVERS = [("Vistula", "Warsaw", 1047), ("Seine", "Paris", 777), ("Thames", "London", 346),
          ("Danube", "Vienna", 2850), ("Tiber", "Rome", 406)]
SQUAD = {"version": "1.1",
         "data": [_squad_article(i, *RIVERS[i % len(RIVERS)]) for i in range(50)]}


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A data dir with small SST-2, STS-B, CoLA and SQuAD files in the shared/data layout."""
    root = tmp_path / "data"
    rows = SENTENCES * 6
    _write(root / "glue/SST-2/train.tsv",
           "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
    _write(root / "glue/SST-2/dev.tsv",
           "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in SENTENCES), gz=False)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    sts = [f"{i}\tg\tf\t2012\t0\tn\tn\t{s}\t{SENTENCES[(i + 1) % 8][0]}\t{i % 6}.0\n"
           for i, (s, _) in enumerate(rows)]
    _write(root / "glue/STS-B/train.tsv", header + "".join(sts))
    _write(root / "glue/STS-B/dev.tsv", header + "".join(sts[:16]))
    cola = "".join(f"src\t{y}\t\t{s}\n" for s, y in rows)
    _write(root / "glue/CoLA/train.tsv", cola)
    _write(root / "glue/CoLA/dev.tsv", cola)
    _write(root / "squad_v1.1/dev-v1.1.json", json.dumps(SQUAD))
    return root
