"""What a model is asked: its classes, the positive class, and how dataset labels map onto them.

Data sets carry different label sets (BUSI has normal, benign and malignant; BUS-BRA has no normal
class), so a model's task is derived from the labels by configuration instead of by rewriting
manifests: `malignant_vs_rest` merges normal and benign, `benign_vs_malignant` leaves normal frames
out, `normal_vs_malignant` leaves benign frames out, `normal_vs_abnormal` merges benign and
malignant. The task travels in the model card, so
training, evaluation, calibration and the device map a label the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgebc.config import look_up_option
from edgebc.data.records import CLASS_NAMES
from edgebc.errors import EdgebcError


@dataclass(frozen=True)
class Task:
    """`classes` are the model's outputs in order; `merge` maps a dataset label onto one of them
    (a label that is a class maps to itself); labels neither in `classes` nor in `merge` are not
    part of the task and are left out of training and scoring."""

    name: str
    classes: tuple[str, ...]
    positive_class: str
    merge: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(
                f"task {self.name!r}: classes must be at least two distinct names, got {list(self.classes)}"
            )
        if self.positive_class not in self.classes:
            raise ValueError(
                f"task {self.name!r}: positive_class {self.positive_class!r} is not among the classes {list(self.classes)}"
            )
        strays = {
            label: target for label, target in self.merge.items() if target not in self.classes
        }
        if strays:
            raise ValueError(f"task {self.name!r}: merge targets {strays} are not classes")

    @property
    def positive(self) -> int:
        return self.classes.index(self.positive_class)

    @property
    def labels(self) -> tuple[str, ...]:
        """Every dataset label the task takes."""
        return (*self.classes, *(label for label in self.merge if label not in self.classes))

    def class_of(self, label: str) -> str | None:
        """The class a dataset label counts as, or None when the task leaves it out."""
        if label in self.classes:
            return label
        return self.merge.get(label)

    def takes(self, label: str) -> bool:
        return self.class_of(label) is not None

    def partition(
        self, labels: Sequence[str], source: str = "labels"
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Which of `labels` the task scores (a boolean mask) and how many of each label it leaves
        out. Leaving out is for the project's own labels (normal frames under
        benign_vs_malignant, benign frames under normal_vs_malignant); any other label is a mistake in the data and is refused."""
        strays = sorted({label for label in labels if not self.takes(label)} - set(CLASS_NAMES))
        if strays:
            raise EdgebcError(
                f"{source}: labels {strays} are not classes of this model ({list(self.labels)})"
            )
        keep = np.array([self.takes(label) for label in labels], bool)
        return keep, dict(Counter(label for label in labels if not self.takes(label)))

    def encode(self, labels: Iterable[str], source: str = "labels") -> np.ndarray:
        """Class indices of `labels`, all of which must belong to the task."""
        out = []
        for label in labels:
            name = self.class_of(label)
            if name is None:
                raise EdgebcError(
                    f"{source}: label {label!r} is not part of task {self.name} "
                    f"(it takes {', '.join(self.labels)})"
                )
            out.append(self.classes.index(name))
        return np.array(out, np.int64)


TASKS: Mapping[str, Task] = {
    task.name: task
    for task in (
        Task("three_class", ("normal", "benign", "malignant"), "malignant"),
        Task(
            "malignant_vs_rest",
            ("not_malignant", "malignant"),
            "malignant",
            {"normal": "not_malignant", "benign": "not_malignant"},
        ),
        Task("benign_vs_malignant", ("benign", "malignant"), "malignant"),
        Task("normal_vs_malignant", ("normal", "malignant"), "malignant"),
        Task(
            "normal_vs_abnormal",
            ("normal", "abnormal"),
            "abnormal",
            {"benign": "abnormal", "malignant": "abnormal"},
        ),
    )
}


def named_task(name: str) -> Task:
    return TASKS[look_up_option(name, TASKS, what="task")]


def task_for(
    name: str | None, classes: Sequence[str] | None = None, positive_class: str | None = None
) -> Task:
    """The task a configuration asks for: a named one, or the custom task of exactly `classes`
    (a custom task equal to a named one is that one, so cards compare by name)."""
    if name is not None:
        task = named_task(name)
        if classes is not None and tuple(classes) != task.classes:
            raise ValueError(
                f"task {name} has the classes {list(task.classes)}; drop data.classes or make them equal"
            )
        if positive_class is not None and positive_class != task.positive_class:
            raise ValueError(
                f"task {name} has the positive class {task.positive_class!r}, not {positive_class!r}"
            )
        return task
    if classes is None:
        return TASKS["three_class"]
    custom = Task("custom", tuple(classes), positive_class or "malignant")
    for task in TASKS.values():
        if not task.merge and (task.classes, task.positive_class) == (
            custom.classes,
            custom.positive_class,
        ):
            return task
    return custom
