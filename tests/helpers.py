"""Helpers shared by test modules (not tests themselves)."""


def make_checkpoint(path, arch="simple_cnn", size=48, seed=0):
    """A real, self-describing edgebc checkpoint of an untrained `arch`, for export and runtime tests."""
    from edgebc.train.checkpoint import save_untrained_checkpoint

    return save_untrained_checkpoint(path, arch, size, seed)


def demo_model_as(folder, name, modality="us", **preprocess):
    """The embedded demo model's graph under a changed card: input `modality`, preprocessing
    fields `preprocess` changed, not marked the demo (so it answers rather than withdraws);
    written with its MANIFEST.sha256 as folder/name.onnx. Torch-free."""
    import dataclasses

    import onnx

    from edgebc.backends import open_backend
    from edgebc.demo import DEMO_LINEAGE_KEY, DEMO_MODEL
    from edgebc.integrity import write_manifest
    from edgebc.model_card import CARD_KEY

    card = open_backend(DEMO_MODEL).card
    inputs = tuple(
        dataclasses.replace(
            i, modality=modality, preprocess=dataclasses.replace(i.preprocess, **preprocess)
        )
        for i in card.inputs
    )
    lineage = {k: v for k, v in card.lineage.items() if k != DEMO_LINEAGE_KEY}
    graph = onnx.load(str(DEMO_MODEL))
    for entry in graph.metadata_props:
        if entry.key == CARD_KEY:
            entry.value = dataclasses.replace(card, inputs=inputs, lineage=lineage).to_json()
    path = folder / f"{name}.onnx"
    onnx.save(graph, str(path))
    write_manifest(folder, sorted(folder.glob("*.onnx")))
    return path


def split_phantoms(root):
    """A small labelled phantom set (12 per class, 64 px) split train/val/test, for the export
    and INT8 tests: the manifest path."""
    from edgebc.data import read_manifest, write_manifest
    from edgebc.data.split import SplitPlan, assign_splits
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

    manifest = write_phantom_dataset(root, SynthPlan(n_per_class=12, size=64, seed=4))
    return write_manifest(
        assign_splits(read_manifest(manifest), SplitPlan(val=0.3, test=0.2, seed=0)),
        root / "split.csv",
    )
