"""Helpers shared by test modules (not tests themselves)."""

from edgebc.preprocess import PreprocessCard


def make_checkpoint(path, arch="simple_cnn", size=48, seed=0):
    """A real, self-describing edgebc checkpoint of an untrained `arch`, for export and runtime tests."""
    import torch

    from edgebc.train.checkpoint import save_checkpoint
    from edgebc.train.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch).eval()
    card = PreprocessCard(input_height=size, input_width=size)
    options = {
        "arch": arch,
        "width_mult": 1.0,
        "head": "linear",
        "dropout": 0.2,
        "pretrained": None,
    }
    save_checkpoint(path, {
        "arch": arch, "model": options, "class_names": ["normal", "benign", "malignant"], "positive_class": "malignant",
        "preprocess": card.to_dict(), "state_dict": model.state_dict(), "temperature": 1.5, "epoch": 3,
        "operating_point": {"threshold": 0.3, "target_sensitivity": 0.95, "sensitivity": 0.96, "specificity": 0.5},
        "metrics": {"val_auc_positive": 0.9}, "weights_sha256": "ab" * 32, "data_fingerprint": "cd" * 32,
    })  # fmt: skip
    return path
