"""What `edgebc info` reports about accelerators and cameras, checked where they exist."""

import importlib.metadata

import pytest

from edgebc import sysinfo


@pytest.mark.gpu
def test_info_lists_the_gpu_that_nvidia_smi_sees():
    gpus = sysinfo.nvidia_gpus()
    assert gpus and all("," in line for line in gpus)  # name, memory, driver


@pytest.mark.tensorrt
def test_info_reports_the_tensorrt_version():
    assert sysinfo.collect()["packages"]["tensorrt"] == importlib.metadata.version("tensorrt")


@pytest.mark.camera
def test_info_lists_the_capture_devices():
    assert sysinfo.collect()["video_devices"]


def test_cpu_description_names_cores_and_features():
    cpu = sysinfo.cpu_description()
    assert cpu["logical_cores"] >= 1 and isinstance(cpu["features"], list)
