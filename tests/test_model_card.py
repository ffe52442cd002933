"""The model card as the one record: tasks, several inputs and outputs, migration of older files."""

import json
from dataclasses import replace

import numpy as np
import pytest

from edgebc.decision import DecisionRule
from edgebc.demo import DEMO_MODEL
from edgebc.errors import ConfigError, EdgebcError
from edgebc.model_card import (
    ModelCard,
    ModelInput,
    ModelOutput,
    OperatingPoint,
    read_card,
    single_input,
)
from edgebc.preprocess import PreprocessCard
from edgebc.task import TASKS, Task, named_task, task_for

SCHEMA1 = {
    "name": "old", "arch": "simple_cnn", "class_names": ["normal", "benign", "malignant"],
    "positive_class": "malignant", "preprocess": {"input_height": 48, "input_width": 48},
    "input_name": "input", "output_name": "logits", "temperature": 1.5, "threshold": 0.3,
    "target_sensitivity": 0.95, "metrics": {"val_auc_positive": 0.9}, "weights_sha256": "ab" * 32,
    "lineage": {"pretrained": None, "distilled_from": []}, "schema": 1,
}  # fmt: skip


def test_tasks_map_dataset_labels_onto_their_classes():
    labels = ["normal", "benign", "malignant", "benign"]
    assert TASKS["three_class"].encode(labels).tolist() == [0, 1, 2, 1]
    assert TASKS["malignant_vs_rest"].encode(labels).tolist() == [0, 0, 1, 0]
    assert TASKS["normal_vs_abnormal"].encode(labels).tolist() == [0, 1, 1, 1]
    benign_vs_malignant = TASKS["benign_vs_malignant"]
    assert [benign_vs_malignant.takes(label) for label in labels] == [False, True, True, True]
    with pytest.raises(EdgebcError, match="label 'normal' is not part of task benign_vs_malignant"):
        benign_vs_malignant.encode(labels)
    assert TASKS["normal_vs_abnormal"].positive_class == "abnormal"
    # a class list equal to a named task is that task; anything else is a custom task
    assert task_for(None, ("normal", "benign", "malignant"), "malignant").name == "three_class"
    assert task_for(None, ("benign", "malignant"), "malignant").name == "benign_vs_malignant"
    assert task_for(None, ("a", "b"), "b") == Task("custom", ("a", "b"), "b")
    with pytest.raises(ConfigError, match="Did you mean 'malignant_vs_rest'"):
        named_task("malignant_vs_res")
    with pytest.raises(ValueError, match=r"drop data\.classes or make them equal"):
        task_for("benign_vs_malignant", ("normal", "benign", "malignant"))
    with pytest.raises(ValueError, match="merge targets"):
        Task("broken", ("a", "b"), "b", {"c": "d"})


def test_a_schema_1_card_is_migrated_with_nothing_lost():
    card = ModelCard.from_json(json.dumps(SCHEMA1))
    assert card.schema == 2 and card.task.name == "three_class"
    assert card.class_names == ("normal", "benign", "malignant") and card.positive == 2
    assert card.operating_point == OperatingPoint(0.3, 0.95)
    assert card.threshold == 0.3 and card.temperature == 1.5
    assert card.inputs == (ModelInput("input", PreprocessCard(input_height=48, input_width=48)),)
    assert card.outputs == (ModelOutput("logits", "logits", 3),)
    assert card.metrics == {"val_auc_positive": 0.9} and card.weights_sha256 == "ab" * 32
    # written back it is schema 2 and reads back identically
    assert ModelCard.from_json(card.to_json()) == card
    # the embedded demo model was exported with schema 1 and still loads
    demo = read_card(DEMO_MODEL)
    assert demo.class_names == ("normal", "benign", "malignant") and demo.threshold is not None
    with pytest.raises(EdgebcError, match="schema 3 is newer than this edgebc understands"):
        ModelCard.from_dict({**card.to_dict(), "schema": 3})


def test_a_card_refuses_what_cannot_be():
    prep = PreprocessCard(input_height=32, input_width=32)
    task = TASKS["three_class"]
    with pytest.raises(ValueError, match="exactly one logits output"):
        ModelCard("m", "a", task, single_input(prep), (ModelOutput("f", "features", 8),))
    with pytest.raises(ValueError, match="names must be distinct"):
        ModelCard("m", "a", task, single_input(prep, name="x"), (ModelOutput("x"),))
    with pytest.raises(ValueError, match="at least one input must be required"):
        ModelCard("m", "a", task, (ModelInput("us", prep, optional=True),))
    with pytest.raises(ValueError, match="threshold is a probability"):
        OperatingPoint(1.5)
    two = ModelCard("m", "a", task, (ModelInput("us", prep), ModelInput("mg", prep, "mg")))
    with pytest.raises(EdgebcError, match="has 2 inputs \\(us, mg\\): give each by name"):
        _ = two.preprocess


def test_the_decision_rule_and_its_hysteresis():
    rule = DecisionRule(("normal", "benign", "malignant"), 2, threshold=0.3)
    assert rule.decide(np.array([0.1, 0.55, 0.35])) == "malignant"  # reaches the threshold
    assert rule.decide(np.array([0.5, 0.3, 0.2])) == "normal"  # else the most probable other
    assert DecisionRule(rule.class_names, 2).decide(np.array([0.1, 0.55, 0.35])) == "benign"
    # shown malignant: held down to threshold x (1 - margin) = 0.27, then left
    assert rule.index(np.array([0.1, 0.62, 0.28]), shown=2, margin=0.1) == 2
    assert rule.index(np.array([0.1, 0.64, 0.26]), shown=2, margin=0.1) == 1
    # between the others a challenger must lead the shown class by the margin
    assert rule.index(np.array([0.44, 0.5, 0.06]), shown=0, margin=0.1) == 0
    assert rule.index(np.array([0.39, 0.55, 0.06]), shown=0, margin=0.1) == 1
    assert rule.decided_names(np.array([[0.1, 0.55, 0.35], [0.5, 0.3, 0.2]])) == [
        "malignant",
        "normal",
    ]


def test_a_shipped_card_names_no_folder_of_the_machine_it_was_built_on():
    """Every path a card can carry (source checkpoint, teachers, pretrained file, a site's data, at
    any depth) is cut to its folder and file; the demo model shipped in the package is clean."""
    from edgebc.model_card import machine_paths, without_machine_paths

    demo = read_card(DEMO_MODEL)
    assert machine_paths(demo.to_dict()) == []
    lineage = {
        "pretrained": "/home/ana/.cache/torch/mobilenet_v3_small.pth",
        "distilled_from": [{"path": "C:\\Users\\ana\\runs\\t0\\best.pt", "arch": "resnet18"},
                           {"path": "../../scratch/t1/best.pt", "arch": "resnet18"}],
        "site_calibration": {"data": "~/clinic/site-cases.csv", "previous": {"data": "/srv/a/b.csv"}},
        "note": "runs/t2/best.pt",  # relative inside a run folder: kept as it is
    }  # fmt: skip
    built = replace(demo, source_checkpoint="/home/ana/runs/demo/best.pt", lineage=lineage)
    assert len(machine_paths(built.to_dict())) == 6
    shipped = without_machine_paths(built)
    assert machine_paths(shipped.to_dict()) == []
    assert shipped.source_checkpoint == "demo/best.pt"
    assert shipped.lineage == {
        "pretrained": "torch/mobilenet_v3_small.pth",
        "distilled_from": [{"path": "t0/best.pt", "arch": "resnet18"},
                           {"path": "t1/best.pt", "arch": "resnet18"}],
        "site_calibration": {"data": "clinic/site-cases.csv", "previous": {"data": "a/b.csv"}},
        "note": "runs/t2/best.pt",
    }  # fmt: skip


def test_a_fusion_card_may_make_every_input_optional():
    """Its head takes which branches are present, so US alone, MG alone or both answer."""
    prep = PreprocessCard(input_height=32, input_width=32)
    task = TASKS["three_class"]
    both = (ModelInput("us", prep, optional=True), ModelInput("mg", prep, "mg", optional=True))
    assert all(i.optional for i in ModelCard("f", "late_fusion", task, both).inputs)
