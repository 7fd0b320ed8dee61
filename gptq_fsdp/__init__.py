"""GPTQ quantization of language models, also while they stay sharded (FSDP2, DeepSpeed ZeRO-3)."""

from importlib.metadata import version

__version__ = version("gptq_fsdp")  # before the imports below: resume records it

from gptq_fsdp.api import quantize, save_quantized
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.gptq import GPTQResult, gptq_quantize
from gptq_fsdp.core.scheme import GPTQError
from gptq_fsdp.data import CalibrationSet, build_calibration, load_texts
from gptq_fsdp.pipeline import QuantizationResult, quantize_model

__all__ = [
    "CalibrationSet",
    "GPTQConfig",
    "GPTQError",
    "GPTQResult",
    "QuantizationResult",
    "build_calibration",
    "gptq_quantize",
    "load_texts",
    "quantize",
    "quantize_model",
    "save_quantized",
    "__version__",
]
