"""transformers Trainer integration: quantize and save at the end of training, in the same job."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from gptq_fsdp.api import quantize, save_quantized
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import CalibrationSet


class GPTQCallback(TrainerCallback):
    """`Trainer(..., callbacks=[GPTQCallback(calibration, "out-w4a16")])`: after `train()`, GPTQ the
    trained model where it lies (one process, FSDP2 or DeepSpeed ZeRO-3) and write the checkpoint."""

    def __init__(
        self,
        calibration: CalibrationSet | str | list[str],
        output_dir: str | Path,
        config: GPTQConfig | None = None,
        *,
        tokenizer=None,
        num_samples: int = 128,
        max_seq_length: int = 2048,
        overwrite: bool = False,
    ) -> None:
        self.calibration, self.output_dir, self.config = calibration, Path(output_dir), config
        self.tokenizer, self.overwrite = tokenizer, overwrite
        self.num_samples, self.max_seq_length = num_samples, max_seq_length
        self.result = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        self.result = quantize(
            model,
            self.calibration,
            self.config,
            tokenizer=tokenizer,
            num_samples=self.num_samples,
            max_seq_length=self.max_seq_length,
        )
        save_quantized(model, self.output_dir, tokenizer=tokenizer, overwrite=self.overwrite)
        return control
