"""The task registry: every data set skimbench knows, its kind, metric, length and splits.

Local files come first (layout of shared/data, see README "Data"), then the HuggingFace hub,
then a one-line DataError naming the files expected. Where a training split is not available
locally, the deterministic offline split of DESIGN section 9 is used and named in every record.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from skimbench.data import DATA_DIR_ENV, FileLog, field_of
from skimbench.errors import DataError, did_you_mean
from skimbench.hub import hub_offline
from skimbench.qa import QAExample, squad_articles

CLASSIFICATION, REGRESSION, EXTRACTIVE_QA = "classification", "regression", "extractive_qa"
OFFLINE_SPLIT_SEED = 0  # fixed, not the run seed: every run of a task sees the same eval set


@dataclass
class TextExample:
    """One sentence or sentence pair with its label (class index, or a float for regression)."""

    id: str
    text: str
    text_pair: str | None
    label: int | float


@dataclass
class TaskData:
    train: list
    eval: list
    split: str                     # what was trained and evaluated on, named in every record
    source: str                    # "local" or "hub"


@dataclass(frozen=True)
class Task:
    key: str
    title: str
    kind: str
    labels: tuple[str, ...]        # class names in index order; () for regression and QA
    metrics: tuple[str, ...]
    main_metric: str
    max_length: int                # `sequence` padding length (Transkimmer Table 2 where given)
    local_files: tuple[str, ...]   # relative to the data dir, each may also end in .gz
    load_local: Callable[[Task, Path, FileLog], TaskData]
    hub: tuple[str, str | None, str, str] | None  # (path, config, train split, eval split)
    paper_name: str = ""           # the `dataset` of this task in paper-numbers.csv

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.labels)

    def label_index(self, value, path: Path, number: int) -> int | float:
        """A label read from a file as its index (or float), with a DataError if it is not one."""
        try:
            if self.kind == REGRESSION:
                return float(value)
            if isinstance(value, str) and value in self.labels:
                return self.labels.index(value)
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(self.labels):
            raise DataError(f"data file {path} row {number}: label {value!r} is not one of "
                            f"{list(self.labels)} (or their indices)")
        return index


def _required(task: Task, root: Path, log: FileLog, relative: str) -> Path:
    path = log.find(root, relative)
    if path is None:
        raise DataError(f"task {task.key}: missing data file {root / relative}[.gz]; expected "
                        f"{', '.join(task.local_files)} (each optionally .gz) under {root}")
    return path


def _tsv(text_col: str, pair_col: str | None, label_col: str, id_col: str | None = None):
    """A loader for a GLUE TSV with a header: columns named by the header."""

    def read(task: Task, path: Path, log: FileLog) -> list[TextExample]:
        out = []
        for number, row in enumerate(log.read_tsv(path), start=2):
            out.append(TextExample(
                id=str(row[id_col]) if id_col else f"{number - 2}",
                text=field_of(row, text_col, path, number),
                text_pair=field_of(row, pair_col, path, number) if pair_col else None,
                label=task.label_index(field_of(row, label_col, path, number), path, number)))
        return out

    return read


def _cola(task: Task, path: Path, log: FileLog) -> list[TextExample]:
    out = []
    for number, row in enumerate(log.read_tsv(path, header=False), start=1):
        if len(row) != 4:
            raise DataError(f"data file {path} line {number}: expected 4 tab-separated columns "
                            f"(source, label, mark, sentence), found {len(row)}")
        out.append(TextExample(str(number - 1), row[3], None,
                               task.label_index(row[1], path, number)))
    return out


def _jsonl(text_key: str, pair_key: str | None, label_key: str, id_key: str):
    def read(task: Task, path: Path, log: FileLog) -> list[TextExample]:
        out = []
        for number, row in enumerate(log.read_jsonl(path), start=1):
            out.append(TextExample(
                str(field_of(row, id_key, path, number)), field_of(row, text_key, path, number),
                field_of(row, pair_key, path, number) if pair_key else None,
                task.label_index(field_of(row, label_key, path, number), path, number)))
        return out

    return read


def _csv_label_first(task: Task, path: Path, log: FileLog) -> list[TextExample]:
    """Zhang et al. (2015) CSVs: class (1-based), then one or two text columns, no header."""
    out = []
    for number, row in enumerate(log.read_csv(path), start=1):
        if len(row) < 2:
            raise DataError(f"data file {path} line {number}: expected class,text[,text] "
                            f"columns, found {len(row)}")
        label = task.label_index(int(row[0]) - 1 if row[0].isdigit() else row[0], path, number)
        out.append(TextExample(str(number - 1), " ".join(c.strip() for c in row[1:]), None, label))
    return out


def _hatexplain(task: Task, path: Path, log: FileLog) -> list[TextExample]:
    rows = log.read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"data file {path}: expected a JSON list of [text, label] pairs")
    out = []
    for number, row in enumerate(rows, start=1):
        if not (isinstance(row, list) and len(row) == 2):
            raise DataError(f"data file {path} item {number}: expected [text, label]")
        out.append(TextExample(str(number - 1), row[0], None,
                               task.label_index(row[1], path, number)))
    return out


def _train_eval(reader, train_file: str, eval_file: str):
    """Train on one file, evaluate on another (the standard splits)."""

    def load(task: Task, root: Path, log: FileLog) -> TaskData:
        train_path = _required(task, root, log, train_file)
        eval_path = _required(task, root, log, eval_file)
        return TaskData(reader(task, train_path, log), reader(task, eval_path, log),
                        split=f"train={train_file}; eval={eval_file}", source="local")

    return load


def _split_80_20(reader, file: str):
    """Offline split (DESIGN 9): a seeded 80/20 split of the one file available locally."""

    def load(task: Task, root: Path, log: FileLog) -> TaskData:
        examples = reader(task, _required(task, root, log, file), log)
        order = list(range(len(examples)))
        random.Random(OFFLINE_SPLIT_SEED).shuffle(order)
        cut = int(0.8 * len(order))
        return TaskData([examples[i] for i in sorted(order[:cut])],
                        [examples[i] for i in sorted(order[cut:])],
                        split=f"offline: seeded 80/20 split of {file} (seed {OFFLINE_SPLIT_SEED})",
                        source="local")

    return load


def _squad(file: str, train_articles: int):
    """Offline split (DESIGN 9): train on the first dev articles, evaluate on the rest."""

    def load(task: Task, root: Path, log: FileLog) -> TaskData:
        path = _required(task, root, log, file)
        squad = log.read_json(path)
        try:
            articles = squad_articles(squad)
        except (KeyError, TypeError) as exc:
            raise DataError(f"data file {path}: not in SQuAD format (missing {exc})") from None
        train = [ex for article in articles[:train_articles] for ex in article]
        evaluation = [ex for article in articles[train_articles:] for ex in article]
        return TaskData(train, evaluation, source="local",
                        split=f"offline: {file} articles 1-{train_articles} train, "
                              f"{train_articles + 1}-{len(articles)} eval")

    return load


GLUE_PAIR = ("sentence1", "sentence2")
ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {t.key: t for t in [
    Task("cola", "GLUE CoLA", CLASSIFICATION, ("unacceptable", "acceptable"), ("matthews",),
         "matthews", 64, ("glue/CoLA/train.tsv", "glue/CoLA/dev.tsv"),
         _train_eval(_cola, "glue/CoLA/train.tsv", "glue/CoLA/dev.tsv"),
         ("nyu-mll/glue", "cola", "train", "validation"), paper_name="CoLA"),
    Task("sst2", "GLUE SST-2", CLASSIFICATION, ("negative", "positive"), ("accuracy",),
         "accuracy", 64, ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"),
         _train_eval(_tsv("sentence", None, "label"), "glue/SST-2/train.tsv",
                     "glue/SST-2/dev.tsv"),
         ("nyu-mll/glue", "sst2", "train", "validation"), paper_name="SST-2"),
    Task("mrpc", "GLUE MRPC", CLASSIFICATION, ("not_equivalent", "equivalent"),
         ("f1", "accuracy"), "f1", 128, ("glue/MRPC/train.tsv", "glue/MRPC/dev.tsv"),
         _train_eval(_tsv("#1 String", "#2 String", "Quality"), "glue/MRPC/train.tsv",
                     "glue/MRPC/dev.tsv"),
         ("nyu-mll/glue", "mrpc", "train", "validation"), paper_name="MRPC"),
    Task("stsb", "GLUE STS-B", REGRESSION, (), ("pearson", "spearman"), "pearson", 64,
         ("glue/STS-B/train.tsv", "glue/STS-B/dev.tsv"),
         _train_eval(_tsv(*GLUE_PAIR, "score"), "glue/STS-B/train.tsv", "glue/STS-B/dev.tsv"),
         ("nyu-mll/glue", "stsb", "train", "validation"), paper_name="STS-B"),
    Task("rte", "GLUE RTE", CLASSIFICATION, ENTAILMENT, ("accuracy",), "accuracy", 256,
         ("glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
         _train_eval(_tsv(*GLUE_PAIR, "label"), "glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
         ("nyu-mll/glue", "rte", "train", "validation"), paper_name="RTE"),
    Task("wnli", "GLUE WNLI", CLASSIFICATION, ("not_entailment", "entailment"), ("accuracy",),
         "accuracy", 128, ("glue/WNLI/train.tsv", "glue/WNLI/dev.tsv"),
         _train_eval(_tsv(*GLUE_PAIR, "label"), "glue/WNLI/train.tsv", "glue/WNLI/dev.tsv"),
         ("nyu-mll/glue", "wnli", "train", "validation"), paper_name="WNLI"),
    Task("qnli", "GLUE QNLI", CLASSIFICATION, ENTAILMENT, ("accuracy",), "accuracy", 128,
         ("glue/QNLI/dev.tsv",),
         _split_80_20(_tsv("question", "sentence", "label", "index"), "glue/QNLI/dev.tsv"),
         ("nyu-mll/glue", "qnli", "train", "validation"), paper_name="QNLI"),
    Task("mnli", "GLUE MNLI", CLASSIFICATION, ("entailment", "neutral", "contradiction"),
         ("accuracy",), "accuracy", 128,
         ("glue/MNLI/dev_matched.jsonl", "glue/MNLI/dev_mismatched.jsonl"),
         _train_eval(_jsonl("premise", "hypothesis", "label", "idx"),
                     "glue/MNLI/dev_matched.jsonl", "glue/MNLI/dev_mismatched.jsonl"),
         ("nyu-mll/glue", "mnli", "train", "validation_matched"), paper_name="MNLI"),
    Task("qqp", "GLUE QQP", CLASSIFICATION, ("not_duplicate", "duplicate"),
         ("accuracy", "f1"), "accuracy", 128, ("glue/QQP/train.tsv", "glue/QQP/dev.tsv"),
         _train_eval(_tsv("question1", "question2", "is_duplicate", "id"),
                     "glue/QQP/train.tsv", "glue/QQP/dev.tsv"),
         ("nyu-mll/glue", "qqp", "train", "validation"), paper_name="QQP"),
    Task("imdb", "IMDB", CLASSIFICATION, ("negative", "positive"), ("accuracy",), "accuracy",
         512, ("imdb/train.jsonl", "imdb/test.jsonl"),
         _train_eval(_jsonl("text", None, "label", "id"), "imdb/train.jsonl",
                     "imdb/test.jsonl"),
         ("stanfordnlp/imdb", None, "train", "test"), paper_name="IMDB"),
    Task("yelp", "Yelp review full (5 classes)", CLASSIFICATION,
         ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"), ("accuracy",), "accuracy", 512,
         ("yelp/train.csv", "yelp/test.csv"),
         _train_eval(_csv_label_first, "yelp/train.csv", "yelp/test.csv"),
         ("Yelp/yelp_review_full", None, "train", "test"), paper_name="Yelp"),
    Task("20news", "20 Newsgroups (bydate)", CLASSIFICATION, tuple(
        "alt.atheism comp.graphics comp.os.ms-windows.misc comp.sys.ibm.pc.hardware "
        "comp.sys.mac.hardware comp.windows.x misc.forsale rec.autos rec.motorcycles "
        "rec.sport.baseball rec.sport.hockey sci.crypt sci.electronics sci.med sci.space "
        "soc.religion.christian talk.politics.guns talk.politics.mideast talk.politics.misc "
        "talk.religion.misc".split()), ("accuracy",), "accuracy", 512,
         ("20newsgroups/train.jsonl", "20newsgroups/test.jsonl"),
         _train_eval(_jsonl("text", None, "label", "id"), "20newsgroups/train.jsonl",
                     "20newsgroups/test.jsonl"),
         ("SetFit/20_newsgroups", None, "train", "test"), paper_name="20News"),
    Task("agnews", "AG News", CLASSIFICATION, ("World", "Sports", "Business", "Sci/Tech"),
         ("accuracy",), "accuracy", 128, ("ag_news/test.csv",),
         _split_80_20(_csv_label_first, "ag_news/test.csv"),
         ("fancyzhx/ag_news", None, "train", "test"), paper_name="AG News"),
    Task("dbpedia", "DBpedia-14", CLASSIFICATION, tuple(
        "Company EducationalInstitution Artist Athlete OfficeHolder MeanOfTransportation "
        "Building NaturalPlace Village Animal Plant Album Film WrittenWork".split()),
         ("accuracy",), "accuracy", 128, ("dbpedia/train.csv", "dbpedia/test.csv"),
         _train_eval(_csv_label_first, "dbpedia/train.csv", "dbpedia/test.csv"),
         ("fancyzhx/dbpedia_14", None, "train", "test"), paper_name="DBpedia"),
    Task("hatexplain", "HateXplain", CLASSIFICATION, ("hatespeech", "normal", "offensive"),
         ("accuracy",), "accuracy", 72, ("hatexplain/train.json", "hatexplain/test.json"),
         _train_eval(_hatexplain, "hatexplain/train.json", "hatexplain/test.json"), None, paper_name="HateXplain"),
    Task("squad", "SQuAD v1.1", EXTRACTIVE_QA, (), ("exact_match", "f1"), "f1", 384,
         ("squad_v1.1/dev-v1.1.json",), _squad("squad_v1.1/dev-v1.1.json", 38),
         ("rajpurkar/squad", None, "train", "validation"), paper_name="SQuAD 1.1"),
    Task("squad_v2", "SQuAD v2.0", EXTRACTIVE_QA, (), ("exact", "f1"), "f1", 384,
         ("squad_v2.0/dev-v2.0.reconstructed.json",),
         _squad("squad_v2.0/dev-v2.0.reconstructed.json", 28),
         ("rajpurkar/squad_v2", None, "train", "validation"), paper_name="SQuAD 2.0"),
]}


def get_task(key: str) -> Task:
    try:
        return TASKS[key]
    except KeyError:
        raise did_you_mean("task", key, TASKS, "tasks") from None


def _hub_rows(task: Task, split: str) -> list:
    """One split from the hub, converted to the local example types."""
    import datasets  # heavy; only users with the hub reach this

    datasets.logging.set_verbosity_error()
    path, config, *_ = task.hub
    rows = datasets.load_dataset(path, config, split=split)
    if task.kind == EXTRACTIVE_QA:
        return [QAExample(r["id"], r["question"], r["context"], list(r["answers"]["text"]),
                          list(r["answers"]["answer_start"])) for r in rows]
    names = rows.column_names
    text, pair = [c for c in ("sentence", "sentence1", "question", "question1", "premise",
                              "text", "content") if c in names][:1], None
    for second in ("sentence2", "sentence", "question2", "hypothesis"):
        if second in names and second not in text:
            pair = second
            break
    label = "label" if "label" in names else "labels"
    return [TextExample(str(i), r[text[0]], r[pair] if pair else None,
                        float(r[label]) if task.kind == REGRESSION else int(r[label]))
            for i, r in enumerate(rows)]


def data_source(task: Task, data_dir: Path | None) -> str:
    """"local" if every local file is there, else "hub" if reachable, else one clear error."""
    if data_dir is not None and all(FileLog().find(data_dir, f) for f in task.local_files):
        return "local"
    if task.hub is None or hub_offline():
        where = (f"under {data_dir}" if data_dir is not None
                 else f"(no --data-dir or {DATA_DIR_ENV} given)")
        expected = ", ".join(f"{f}[.gz]" for f in task.local_files)
        raise DataError(f"task {task.key}: no local data {where} and no hub access; expected "
                        f"{expected}; set --data-dir or {DATA_DIR_ENV} to a folder holding them "
                        "(README 'Data')")
    return "hub"


def load_task_data(task: Task, data_dir: Path | None, log: FileLog) -> TaskData:
    """Local files under data_dir first, then the hub, else one line saying what to provide."""
    if data_source(task, data_dir) == "local":
        return task.load_local(task, data_dir, log)
    try:
        train, evaluation = (_hub_rows(task, task.hub[2]), _hub_rows(task, task.hub[3]))
    except Exception as exc:  # any hub failure ends in the same advice
        raise DataError(f"task {task.key}: no local data (expected "
                        f"{', '.join(task.local_files)}) and the hub data set {task.hub[0]} "
                        f"could not be loaded ({type(exc).__name__}); set --data-dir or "
                        f"{DATA_DIR_ENV}") from None
    return TaskData(train, evaluation, source="hub",
                    split=f"hub {task.hub[0]}: train={task.hub[2]}; eval={task.hub[3]}")
