"""CUDA checks of the backbone. Skipped without a GPU; each has a CPU counterpart:
bf16 training -> tests/training/test_trainer.py::test_bf16_autocast_step_runs_on_cpu,
batch invariance -> tests/model/test_rnnt.py::test_encoder_output_does_not_depend_on_the_batch."""

import json

import pytest
import torch

from sparse_rnnt.config import load_config
from sparse_rnnt.model import build_model, model_config
from sparse_rnnt.training.inference import load_recognizer
from sparse_rnnt.training.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_on_cuda_and_cpu_gpu_agreement(tiny_manifests, tmp_path):
    cfg = load_config(None, [
        f"data.manifest_dir={tiny_manifests}", "data.workers=1", "train.max_steps=6", "train.log_every=1",
        "train.eval_every=0", "train.checkpoint_every=3", "train.progress=false", "train.device=cuda",
        "batch.max_frames=400", "model.ctc_weight=0.3",
    ])
    result = Trainer(cfg, tmp_path / "run").run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert result["steps"] == 6
    # The saved checkpoint gives the same encoder output on CPU and GPU (fp32, no TF32).
    cpu = load_recognizer(tmp_path / "run", device="cpu").model
    gpu = load_recognizer(tmp_path / "run", device="cuda").model
    x = torch.randn(3, 90, 80)
    lengths = torch.tensor([90, 64, 33])
    with torch.no_grad():
        a, _ = cpu.encode(x, lengths)
        b, _ = gpu.encode(x.cuda(), lengths.cuda())
    torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=1e-3)


def test_encoder_batch_invariance_on_cuda():
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), 12, verbose=False).cuda().eval()
    lengths = (57, 41, 22)
    x = torch.randn(3, 57, 80, device="cuda")
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    xl = torch.tensor(lengths, device="cuda")
    with torch.no_grad():
        enc, _ = model.encode(x, xl)
        for b, n in enumerate(lengths):
            alone, _ = model.encode(x[b : b + 1, :n], xl[b : b + 1])
            torch.testing.assert_close(enc[b, : n // 4], alone[0], atol=1e-4, rtol=1e-4)
