"""The GPTQ loop over a model's decoder layers (`loop.quantize_model`), in the standard order
(standard.py) or GPTQ's true-sequential one (true_sequential.py); `owners` places GPTQ on ranks,
`job` is one layer's work, `results` what a run produced."""

from gptq_fsdp.pipeline.loop import quantize_model
from gptq_fsdp.pipeline.results import LayerError, ModuleRecord, QuantizationResult

__all__ = ["LayerError", "ModuleRecord", "QuantizationResult", "quantize_model"]
