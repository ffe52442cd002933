"""Training on CUDA: augmentation on the GPU draws what it draws on the CPU, and a run with AMP and
channels-last writes a checkpoint that a CPU-only machine loads and that agrees with the GPU.

Behind the `gpu` marker; on a machine whose torch has no CUDA build they skip with that reason.
"""

import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.preprocess import PreprocessCard
from edgebc.train import loop
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgebc.train.config import AugmentConfig
from edgebc.train.dataset import SampleDataset, cache_tensors
from tests.test_training import _config, tiny_split  # noqa: F401  (the fixture)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_torch():
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no usable CUDA (a CPU wheel?)")


def test_augmentation_on_the_gpu_draws_what_it_draws_on_the_cpu():
    card = PreprocessCard(input_height=64, input_width=64, channels=1, mean=(0.5,), std=(0.25,))
    batch = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    augmenter = BatchAugmenter(AugmentConfig(), card)
    on_cpu = augmenter(batch, torch.Generator().manual_seed(5))
    on_gpu = augmenter(batch.cuda(), torch.Generator().manual_seed(5))
    assert on_gpu.device.type == "cuda" and not torch.equal(on_cpu, batch)
    # Same draws (the generator lives on the CPU); only the kernels' rounding differs.
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_cuda_run_with_amp_writes_a_checkpoint_the_cpu_loads(tiny_split, tmp_path, amp):  # noqa: F811
    config = _config(tiny_split, tmp_path, f"cuda-{amp}", "device=cuda", f"amp={amp}",
                     "channels_last=true", "augment.enabled=true", "optim.epochs=3")  # fmt: skip
    run = loop.train_model(config, show_progress=False)
    best = load_checkpoint(run.best_checkpoint)
    assert all(t.device.type == "cpu" for t in best.state_dict.values())
    assert best.config["device"] == "cuda" and best.config["amp"] == amp
    val = loop.select_samples(config, "val")
    images, _ = cache_tensors(SampleDataset(val, config.preprocess, best.card.task), 1)
    model = model_from_checkpoint(best)
    on_cpu = loop.predict_logits(model, images, torch.device("cpu"))
    on_gpu = loop.predict_logits(model.cuda(), images, torch.device("cuda"))
    assert on_cpu.shape == (len(val), 3) and (abs(on_cpu) < 1e4).all()
    assert abs(on_cpu - on_gpu).max() < 1e-2  # fp32 inference; TF32 may round the convolutions
