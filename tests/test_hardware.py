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


def test_gpu_memory_is_this_processes_share_of_what_nvidia_smi_reports(tmp_path, monkeypatch):
    """nvidia-smi lists every process on the GPU; only this one's memory counts (a stand-in
    nvidia-smi on PATH prints what the real one prints)."""
    import os
    import stat

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --query-compute-apps*) printf "1, 5000\\n{os.getpid()}, 321\\n{os.getpid()}, 4\\n" ;;\n'
        '  *) printf "NVIDIA H200, 143771 MiB, 570.1\\n" ;;\n'
        "esac\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert sysinfo.process_gpu_memory_mb() == 325.0
    assert sysinfo.nvidia_gpus() == ["NVIDIA H200, 143771 MiB, 570.1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sysinfo.process_gpu_memory_mb() is None and sysinfo.nvidia_gpus() == []
