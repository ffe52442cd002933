"""Helpers shared by test modules (not tests themselves)."""


def make_checkpoint(path, arch="simple_cnn", size=48, seed=0):
    """A real, self-describing edgebc checkpoint of an untrained `arch`, for export and runtime tests."""
    from edgebc.train.checkpoint import save_untrained_checkpoint

    return save_untrained_checkpoint(path, arch, size, seed)
