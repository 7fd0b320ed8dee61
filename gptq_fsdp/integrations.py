"""transformers Trainer integration: quantize and save at the end of training, in the same job."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from gptq_fsdp.api import quantize, save_quantized
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import CalibrationSet


class GPTQCallback(TrainerCallback):
    """`Trainer(..., callbacks=[GPTQCallback(calibration, "out-w4a16", config)])`: after `train()`, GPTQ
    the trained model where it lies (one process, FSDP2 or DeepSpeed ZeRO-3) and write the checkpoint.
    `calibration` and `config` are as for `gptq_fsdp.quantize`."""

    def __init__(
        self,
        calibration: CalibrationSet | str | list[str],
        output_dir: str | Path,
        config: GPTQConfig | None = None,
        *,
        tokenizer=None,
        overwrite: bool = False,
    ) -> None:
        self.calibration, self.output_dir, self.config = calibration, Path(output_dir), config
        self.tokenizer, self.overwrite = tokenizer, overwrite
        self.result = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        self.result = quantize(model, self.calibration, self.config, tokenizer=tokenizer)
        save_quantized(model, self.output_dir, tokenizer=tokenizer, overwrite=self.overwrite)
        return control
