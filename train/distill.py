"""Knowledge distillation: one edge model learns from the averaged predictions of trained ones.

Why: on a few hundred frames a from-scratch model's test AUC swings by several hundredths between
seeds (BUSI, MobileNetV3-Small, seeds 0-2: 0.854, 0.899, 0.819), while the average of their
probabilities is steadier and better. A cart cannot afford K models per frame; distillation
(Hinton et al., 2015) trains one model of the same size towards the ensemble's soft predictions,
so the device keeps one model's latency.

The soft targets are computed once, on the un-augmented training tensors: running every teacher
on every augmented batch would double a CPU epoch, and the augmentations here preserve the label.

A teacher must have been trained on exactly the student's training and validation samples (the
checkpoints' data fingerprints agree): a teacher that saw validation or test frames would carry
them into the student and make its validation and test numbers dishonest. It must also share the
student's preprocessing card and class names, since its targets are computed on the student's
input tensors and read in the student's class order. Under k-fold cross-validation each fold's
student needs the teacher trained on that fold: paths name it with `{fold}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgebc import metrics
from edgebc.errors import EdgebcError
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard
from edgebc.task import Task
from edgebc.train.checkpoint import Checkpoint, load_checkpoint

torch = require("torch", "training")

FOLD_PLACEHOLDER = "{fold}"  # in a teacher's path, replaced by the fold number under k-fold


@dataclass(frozen=True)
class Teacher:
    path: Path
    checkpoint: Checkpoint

    def provenance(self) -> dict[str, str]:
        """What the student's card records about this teacher (its lineage)."""
        card = self.checkpoint.card
        return {"path": str(self.path), "arch": card.arch, "weights_sha256": card.weights_sha256}


def load_teachers(
    paths: Sequence[str | Path],
    task: Task,
    prep: PreprocessCard,
    data_fingerprint: str,
    fold: int | None = None,
) -> list[Teacher]:
    """The teacher checkpoints, each checked against the student's task, preprocessing and data.

    With k-fold manifests every fold's run has the same fingerprint (training plus validation is
    the whole non-test data), so the fold must match too: a teacher from another fold trained on
    this run's validation fold.
    """
    teachers = []
    for path in map(Path, paths):
        if FOLD_PLACEHOLDER in str(path):
            raise EdgebcError(
                f"teacher {path}: only --cross-validate fills in {FOLD_PLACEHOLDER} (with each "
                "fold's number); name the teacher's checkpoint itself for a single run"
            )
        checkpoint = load_checkpoint(path)
        card = checkpoint.card
        if card.task != task:
            raise EdgebcError(
                f"teacher {path} predicts classes {list(card.class_names)} (task {card.task.name}) "
                f"but the student is trained on {list(task.classes)} (task {task.name}): its soft "
                "targets would be read in the wrong order or mean other classes"
            )
        theirs, ours = asdict(card.preprocess), asdict(prep)
        differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        if differing:
            raise EdgebcError(
                f"teacher {path} was trained with another preprocessing card (differs in "
                f"{', '.join(differing)}): its predictions on the student's inputs would be wrong"
            )
        if card.data_fingerprint != data_fingerprint:
            raise EdgebcError(
                f"teacher {path} was trained on other samples than this run's training and "
                "validation splits (data fingerprints differ): it may have seen validation or test "
                "frames and would leak them into the student. Train teachers on the same manifest."
            )
        teacher_fold = checkpoint.config.get("data", {}).get("fold")
        if teacher_fold != fold:
            raise EdgebcError(
                f"teacher {path} was trained with data.fold {teacher_fold} but this run uses "
                f"{fold}: its training samples include this run's validation frames"
                + (f" (under --cross-validate, give each fold its own teacher with "
                   f"{FOLD_PLACEHOLDER} in the path, as in runs/cv/fold{FOLD_PLACEHOLDER}/best.pt)"
                   if fold is not None else "")
            )  # fmt: skip
        twin = next(
            (t for t in teachers if t.checkpoint.card.weights_sha256 == card.weights_sha256), None
        )
        if twin is not None:
            raise EdgebcError(
                f"teacher {path} has the same weights as {twin.path}: listing one model twice "
                "would give it double weight in the soft targets"
            )
        teachers.append(Teacher(path, checkpoint))
    return teachers


def soft_targets(
    teachers: Sequence[Teacher], images: torch.Tensor, temperature: float, batch_size: int = 64
) -> torch.Tensor:
    """(N, C) mean over teachers of softmax(logits / temperature) for each image, float32, CPU."""
    from edgebc.train.checkpoint import model_from_checkpoint
    from edgebc.train.loop import predict_logits

    if not teachers:
        raise ValueError("soft_targets needs at least one teacher")
    device = images.device
    probabilities = [
        metrics.softmax(
            predict_logits(
                model_from_checkpoint(t.checkpoint).to(device), images, device, batch_size
            ),
            temperature,
        )
        for t in teachers
    ]
    return torch.from_numpy(sum(probabilities) / len(probabilities)).float()


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    sample_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean over the batch of T^2 * KL(targets || softmax(student / T)).

    The T^2 factor keeps the soft term's gradients on the scale of the hard cross-entropy's as T
    changes (Hinton et al.); the sample weights are the class weights of the hard labels, so the
    soft term counts the rare class as much as the hard term does.
    """
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    log_targets = torch.log(targets.clamp_min(1e-12))
    divergence = (targets * (log_targets - log_student)).sum(dim=1)
    return temperature**2 * (divergence * sample_weights).sum() / sample_weights.sum()
