"""The data layer: dataset readers, the CSV manifest, audits and group-aware splits."""

from edgebc.data.manifest import read_manifest, write_manifest
from edgebc.data.readers import read_busi, read_class_folders, read_dataset, read_mias
from edgebc.data.records import Finding, Sample, load_mask

__all__ = [
    "Finding",
    "Sample",
    "load_mask",
    "read_busi",
    "read_class_folders",
    "read_dataset",
    "read_manifest",
    "read_mias",
    "write_manifest",
]
