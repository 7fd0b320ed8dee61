"""Peer benchmark: GPTQ W4A16 with GPTQModel 7.7 on pre-tokenized token ids, on the CPU.

Run with the interpreter of ``benchmarks/.venv-gptqmodel`` (see ``setup_gptqmodel.sh``)::

    python benchmarks/peer_gptqmodel.py --model DIR --calibration calib.pt \
        --output OUT --group-size 64 --actorder static --dampening 0.01 \
        --block-size 128 --threads 2 --json peer.json

The command line and the JSON mirror ``peer_llmcompressor.py``. Act-order, as
compressed-tensors names it:

- ``static`` (gptq_fsdp's and llm-compressor's scheme in our benchmarks): GPTQModel's
  ``desc_act=True, static_groups=True``: columns solved in descending Hessian-diagonal
  order, each group's scale fixed beforehand from the original weights of its columns in
  their original order (the saved ``g_idx`` is then column // group size);
- ``group``: plain ``desc_act=True``: groups formed in the solving order, each scale taken
  from the error-updated weights when its group starts (a non-trivial ``g_idx``), the
  original GPTQ act-order;
- ``none``: ``desc_act=False`` with ``act_group_aware=False`` (GPTQModel's own default for
  GPTQ is act_group_aware=True, an ordering llm-compressor and gptq_fsdp do not have).

GPTQModel is true-sequential by default (``true_sequential=True``: each subset of a layer,
q/k/v, o, gate/up, down, is calibrated on the outputs of the subsets already quantized);
``--no-true-sequential`` turns that off. GPTQ's block size is fixed at 128 in GPTQModel 7.7
(``GPTQ.quantize``'s default; no config field), so ``--block-size`` only accepts 128.
GPTQModel's ``offload_to_disk`` (finished layers written to a temporary directory during
the run) is on by default; here it is off, as the other tools keep the model in memory
(``--offload-to-disk`` turns it back on). The samples are fed one per forward in their
given order (``batch_size=1``, no length sort), as GPTQModel's default batch size does.

The checkpoint is GPTQModel's ``format="gptq"`` (GPTQ v1: int32 ``qweight``/``qzeros``,
fp16 ``scales``, ``g_idx``; ``quant_method: gptq`` in config.json), which transformers
cannot load without optimum and GPTQModel. ``--dense-output DIR`` also writes the
dequantized model as a plain fp32 HF checkpoint (``scales[g] * (q - zero)`` computed
from the saved tensors), so that any transformers can score it by the same code as the
other tools' checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

# Before GPTQModel's import: its C++ pack kernel (pack_block_cpu) would otherwise be compiled
# just in time (ninja) on first use; the Python packer writes the same layout.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
# GPTQModel 7.7 sizes its CPU worker pool as (cores + 1) // 2 and then asks for a 2-worker
# model-loader sub-pool: on a 2-core machine GPTQModel.load() fails with "Virtual pool
# 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1". Two workers avoid it.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig, __version__  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True, help="torch.save'd LongTensor [N, L]")
    p.add_argument("--output", required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--actorder", default="static", choices=["static", "group", "none"])
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128, choices=[128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--matmul-precision", default="highest", help="torch.set_float32_matmul_precision")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument(
        "--offload-to-disk",
        action="store_true",
        help="GPTQModel's default: finished layers written to a temporary directory during the run",
    )
    p.add_argument("--dense-output", default=None, help="also write the dequantized fp32 model here")
    p.add_argument(
        "--score-tokens",
        default=None,
        help="torch.save'd [1, T] token ids: also score the saved checkpoint as GPTQModel loads it (its own CPU "
        "kernel), with gptq_fsdp/evaluate.py's perplexity (slow)",
    )
    p.add_argument("--json", default=None)
    return p.parse_args()


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding 8 nibbles each (lowest first) along `dim` -> int values along `dim`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:  # qweight [in / 8, out] -> [in, out]
        q = (packed.unsqueeze(1) >> shifts[None, :, None]) & 0xF
        return q.reshape(-1, packed.shape[1])
    q = (packed.unsqueeze(2) >> shifts[None, None, :]) & 0xF  # qzeros [groups, out / 8] -> [groups, out]
    return q.reshape(packed.shape[0], -1)


def dequantize_gptq_v1(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """Dense [out, in] fp32 weight of a 4-bit GPTQ v1 Linear (v1 stores zero - 1)."""
    q = unpack_int4(qweight, 0).float()
    zeros = unpack_int4(qzeros, 1).float() + 1
    g = g_idx.long()
    return (scales.float()[g] * (q - zeros[g])).t().contiguous()


def write_dense(quantized_dir: Path, dense_dir: Path) -> int:
    """The GPTQ checkpoint dequantized to a plain fp32 HF checkpoint; returns the Linears converted."""
    config = json.loads((quantized_dir / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    if qcfg.get("bits") != 4 or qcfg.get("quant_method") != "gptq" or qcfg.get("format", "gptq") != "gptq":
        raise ValueError(f"only 4-bit GPTQ v1 checkpoints are handled, got {qcfg}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    dense: dict[str, torch.Tensor] = {}
    converted = 0
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            dense[f"{prefix}.weight"] = dequantize_gptq_v1(
                tensor, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"]
            )
            converted += 1
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            dense[name] = tensor.float() if tensor.is_floating_point() else tensor
    if dense_dir.exists():
        shutil.rmtree(dense_dir)
    dense_dir.mkdir(parents=True)
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    config["dtype"] = "float32"
    (dense_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in quantized_dir.iterdir():
        if extra.name.startswith("tokenizer") or extra.name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy(extra, dense_dir / extra.name)
    return converted


def gptq_module_seconds(output: Path) -> float | None:
    """GPTQModel's own per-module GPTQ times (quant_log.csv, column `time`), summed."""
    log = output / "quant_log.csv"
    if not log.exists():
        return None
    with log.open(newline="") as f:
        return round(sum(float(row["time"]) for row in csv.DictReader(f)), 3)


def native_perplexity(output: Path, tokens_path: str) -> float:
    """Perplexity of the saved checkpoint as GPTQModel loads it, by gptq_fsdp's evaluation code.

    gptq_fsdp is not installed in this venv: its evaluate.py (torch and tqdm only) is loaded by path.
    """
    path = Path(__file__).resolve().parents[1] / "gptq_fsdp" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("gptq_fsdp_evaluate", path)
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    model = GPTQModel.load(str(output), device="cpu")
    return evaluate.perplexity(model.model.eval(), torch.load(tokens_path))


def main() -> None:
    args = parse_args()
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    for name in ("calibration", "output", "dense_output", "score_tokens", "json"):
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    # GPTQModel writes its run log to ./logs/gptq_log_*.log (a fixed relative path): next to the output
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    os.chdir(Path(args.output).parent)
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)

    ids = torch.load(args.calibration)
    num_samples, seq_len = ids.shape
    calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]

    desc_act = args.actorder != "none"
    config = QuantizeConfig(
        bits=4,
        group_size=args.group_size,
        sym=True,
        desc_act=desc_act,
        static_groups=args.actorder == "static",
        act_group_aware=False,
        damp_percent=args.dampening,
        true_sequential=args.true_sequential,
        format="gptq",
        device="cpu",
        offload_to_disk=args.offload_to_disk,
    )
    # GPTQModel refuses device= here when config.device is set: it loads on the CPU, quantizes on config.device
    model = GPTQModel.load(args.model, config, dtype=torch.float32)

    t0, cpu0 = time.perf_counter(), time.process_time()
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    quantize_s, quantize_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0

    t0 = time.perf_counter()
    model.save(args.output)
    save_s = time.perf_counter() - t0
    result = {
        "tool": "gptqmodel",
        "version": __version__,
        "torch": torch.__version__,
        "quantize_s": round(quantize_s, 3),
        "quantize_cpu_s": round(quantize_cpu_s, 3),
        "save_s": round(save_s, 3),
        "threads": args.threads,
        "matmul_precision": args.matmul_precision,
        "world_size": 1,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "true_sequential": args.true_sequential,
        "actorder": args.actorder,
        "desc_act": desc_act,
        "static_groups": args.actorder == "static",
        "offload_to_disk": args.offload_to_disk,
        "output": args.output,
        "format": "gptq (v1: qweight/qzeros/scales/g_idx)",
        "gptq_module_s": gptq_module_seconds(Path(args.output)),
    }
    if args.dense_output:
        result["dense_output"] = args.dense_output
        result["dense_linears"] = write_dense(Path(args.output), Path(args.dense_output))
    if args.score_tokens:
        result["native_perplexity"] = native_perplexity(Path(args.output), args.score_tokens)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
