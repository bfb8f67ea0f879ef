"""Task specifications: text columns, label space, metrics and default splits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]  # metric names computed on each evaluation split
    primary_metric: str  # the verdict metric (methods.md#verdicts)
    extra_validation: tuple[str, ...] = field(default_factory=tuple)
    # Binary F1: the class counted as positive, and its name in the task's label set.
    f1_positive_label: int = 1
    f1_positive_class: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("sentence",), 2, ("matthews_correlation", "accuracy"), "matthews_correlation"),
    "sst2": TaskSpec("sst2", ("sentence",), 2, ("accuracy",), "accuracy"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "f1",
                     f1_positive_class="equivalent"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "f1",
                    f1_positive_class="duplicate"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "pearson"),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy",
                     extra_validation=("validation_mismatched",)),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy"),
    # GLUE RTE labels: 0 = entailment, 1 = not_entailment; F1 is the entailment class's.
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy",
                    f1_positive_label=0, f1_positive_class="entailment"),
}

LRA_TASKS: dict[str, TaskSpec] = {
    "listops": TaskSpec("listops", ("source",), 10, ("accuracy",), "accuracy"),
}

TASKS = {"glue": GLUE_TASKS, "lra": LRA_TASKS}


def known_subsets(dataset_name: str) -> list[str]:
    return list(TASKS.get(dataset_name, {}))


# The split names each source publishes (the hub's nyu-mll/glue; ListOps as generated).
GLUE_SPLITS = ("train", "validation", "test")
MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched",
               "test_mismatched")
LISTOPS_SPLITS = ("train", "validation", "test")


def known_splits(dataset_name: str, subset: str) -> tuple[str, ...]:
    """Split names of one task (``dataset.splits.*`` must be one of them)."""
    if dataset_name == "lra":
        return LISTOPS_SPLITS
    return MNLI_SPLITS if subset == "mnli" else GLUE_SPLITS


def get_task(dataset_name: str, subset: str) -> TaskSpec:
    return TASKS[dataset_name][subset]
