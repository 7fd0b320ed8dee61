"""Faults injected with GPTQ_FSDP_FAULT: every rank exits with a clear error, nothing half-written remains."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sharded_helpers import ENV

from gptq_fsdp.cli import main


def cli_args(model_dir, output, austen) -> list[str]:
    return [
        "quantize", str(model_dir), "--dataset", str(austen / "emma.txt"), "--output", str(output),
        "--num-samples", "4", "--max-seq-length", "32", "--batch-size", "2", "--group-size", "32",
    ]  # fmt: skip


def launch(world: int, fault: str, args: list[str]) -> subprocess.CompletedProcess:
    """The CLI under torchrun; a run that does not end within 300 s fails the test (TimeoutExpired)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "gptq_fsdp", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env={**ENV, "GPTQ_FSDP_FAULT": fault}, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["kill:rank=1,layer=1", "hang:rank=1,layer=1"])
def test_dead_or_hung_rank_stops_every_rank_and_writes_nothing(fault, tiny_llama_dir, austen, tmp_path):
    output = tmp_path / "ckpt"
    done = launch(2, fault, [*cli_args(tiny_llama_dir, output, austen), "--timeout", "8"])
    assert done.returncode != 0
    if fault.startswith("hang"):
        assert "rank 0 failed at layer 1" in done.stderr  # the waiting rank names where it was
        assert "8000ms" in done.stderr, done.stderr[-2000:]  # ended by --timeout 8, not the 30-min default
    # No checkpoint and no temporary directory; only the per-layer state that --resume reads.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.gptq_state"]


def test_nan_activations_name_layer_and_modules(tiny_llama_dir, austen, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTQ_FSDP_FAULT", "nan:layer=1")
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tiny_llama_dir, tmp_path / "ckpt", austen))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "failed at layer 1" in err and "model.layers.1." in err and "non-finite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.gptq_state"]  # layer 0 kept for --resume


def test_disk_full_during_save_leaves_no_partial_checkpoint(tiny_llama_dir, austen, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTQ_FSDP_FAULT", "disk_full")
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tiny_llama_dir, tmp_path / "ckpt", austen))
    assert exit_info.value.code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.gptq_state"]  # no checkpoint, no temporary dir


@pytest.mark.distributed
@pytest.mark.parametrize("mode", [[], ["--true-sequential"]], ids=["standard", "true-sequential"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(mode, tiny_llama_dir, austen, tmp_path):
    """Resuming recomputes the finished layers' outputs with their quantized weights: in true-sequential
    mode too, where those outputs came from the quantizing forward itself. The uninterrupted run is
    the one-process run, which 2 uninterrupted ranks equal bit for bit (test_fsdp2,
    test_true_sequential)."""
    from sharded_helpers import dequantized, single_process

    def args(output):
        return [*cli_args(tiny_llama_dir, output, austen), "--num-samples", "8", *mode]

    single_process(tiny_llama_dir, tmp_path / "whole", austen / "emma.txt", 8, true_sequential=bool(mode))
    killed = launch(2, "kill:rank=1,layer=1", args(tmp_path / "resumed"))
    assert killed.returncode != 0 and not (tmp_path / "resumed").exists()
    states = sorted(p.name for p in (tmp_path / "resumed.gptq_state").iterdir())
    assert states == ["rank00000-layer00000.pt", "rank00001-layer00000.pt", "run.json"], states  # layer 0, both ranks
    # Activation offload does not change results, so the resumed run also exercises its recompute path
    # (in the standard order: true-sequential refuses offload).
    offload = [] if mode else ["--offload-activations"]
    resumed = launch(2, "", [*args(tmp_path / "resumed"), "--resume", *offload])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after layer 0" in resumed.stderr
    assert not (tmp_path / "resumed.gptq_state").exists(), "the state is removed once the checkpoint is saved"
    _, expected = dequantized(tmp_path / "whole")
    _, got = dequantized(tmp_path / "resumed")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
