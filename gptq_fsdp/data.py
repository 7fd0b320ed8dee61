"""Calibration data: load text, tokenize, pack into fixed-length samples, split across ranks."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class CalibrationDataError(ValueError):
    """The calibration data cannot give what was asked for."""


@dataclass
class CalibrationSet:
    """Token ids [num_samples, seq_len] and the matching attention mask (0 marks padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[indices], self.attention_mask[indices]

    def save(self, path: str | Path) -> None:
        torch.save({"input_ids": self.input_ids, "attention_mask": self.attention_mask}, path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        data = torch.load(path)
        return cls(data["input_ids"], data["attention_mask"])


def load_texts(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    text_column: str = "text",
    messages_column: str = "messages",
    tokenizer=None,
) -> list[str]:
    """Texts from a local file/dir (txt, json/jsonl, parquet) or a `datasets` name.

    A `.txt` file is read whole (one document). Rows with a chat `messages_column` are rendered
    with the tokenizer's chat template.
    """
    import datasets  # here, not at the top: importing the package (e.g. for `gptq-fsdp plan`) stays light

    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.suffix in LOCAL_BUILDERS or source.count("/") > 1
    if looks_local and not path.exists():  # a hub name is "name" or "org/name": do not ask the hub for a path
        raise CalibrationDataError(f"{source}: no such file or folder")
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
        builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
        if len(builders) != 1 or None in builders:
            found = sorted({p.suffix for p in files}) or "none"
            raise CalibrationDataError(
                f"{source}: expected .txt, .json/.jsonl or .parquet files (one kind), found {found}"
            )
        builder = LOCAL_BUILDERS[files[0].suffix]
        if builder == "text":  # read here: datasets' text builder fails on bytes that are not UTF-8 obscurely
            texts = []
            for file in files:
                try:
                    texts.append(file.read_text(encoding="utf-8"))
                except UnicodeDecodeError as error:
                    raise CalibrationDataError(
                        f"{file}: not UTF-8 text ({error.reason} at byte {error.start})"
                    ) from None
            return _usable(texts, source)
        try:
            dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        except Exception as error:  # datasets wraps every parse failure in DatasetGenerationError
            cause = error.__cause__ or error
            raise CalibrationDataError(
                f"{source}: cannot be read as {builder} ({type(cause).__name__}: {cause})"
            ) from None
    else:
        dataset = datasets.load_dataset(source, config_name, split=split)

    if messages_column in dataset.column_names:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise CalibrationDataError(f"{source}: chat messages need a tokenizer with a chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset[messages_column]]
    if text_column not in dataset.column_names:
        raise CalibrationDataError(
            f"{source}: no '{text_column}' or '{messages_column}' column (columns: {dataset.column_names})"
        )
    values = dataset[text_column]
    if not all(isinstance(t, str) or t is None for t in values):
        kinds = sorted({type(t).__name__ for t in values if not isinstance(t, str) and t is not None})
        raise CalibrationDataError(f"{source}: the '{text_column}' column holds {', '.join(kinds)} values, not text")
    return _usable(values, source)


def _usable(texts: list[str | None], source: str) -> list[str]:
    """The non-blank texts; none at all is an error."""
    kept = [t for t in texts if t and t.strip()]
    if not kept:
        raise CalibrationDataError(f"{source}: holds no text (empty or only whitespace)")
    return kept


def build_calibration(
    texts: list[str],
    tokenizer,
    *,
    num_samples: int,
    max_seq_length: int,
    seed: int = 0,
    pack: bool = True,
) -> CalibrationSet:
    """Tokenize `texts` into `num_samples` samples of at most `max_seq_length` tokens.

    pack=True: documents are joined (EOS between them) and cut into full-length chunks; the
    chunks are shuffled with `seed` and the first `num_samples` kept (no padding anywhere).
    pack=False: one sample per document, truncated, shuffled, right-padded to the longest.
    """
    if num_samples < 1 or max_seq_length < 1:
        raise CalibrationDataError("num_samples and max_seq_length must be positive")
    generator = torch.Generator().manual_seed(seed)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if pack:
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream = torch.tensor([t for doc in encoded for t in [*doc, *separator]], dtype=torch.long)
        available = stream.numel() // max_seq_length
        if available < num_samples:
            raise CalibrationDataError(
                f"the calibration text has {stream.numel()} tokens: {available} samples of {max_seq_length} "
                f"tokens, fewer than the {num_samples} asked; give more text or lower --num-samples/--max-seq-length"
            )
        chunks = stream[: available * max_seq_length].view(available, max_seq_length)
        input_ids = chunks[torch.randperm(available, generator=generator)[:num_samples]]
        return CalibrationSet(input_ids, torch.ones_like(input_ids))

    docs = [doc[:max_seq_length] for doc in encoded if doc]
    if len(docs) < num_samples:
        raise CalibrationDataError(f"only {len(docs)} non-empty documents, fewer than the {num_samples} samples asked")
    chosen = [docs[i] for i in torch.randperm(len(docs), generator=generator)[:num_samples].tolist()]
    length = max(len(d) for d in chosen)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((num_samples, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, length), dtype=torch.long)
    for row, doc in enumerate(chosen):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        attention_mask[row, : len(doc)] = 1
    return CalibrationSet(input_ids, attention_mask)


def rank_batches(num_samples: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Sample indices of `rank`'s forward calls.

    The forward calls are fixed once for all world sizes: the samples, in order, in ceil(n / batch_size)
    near-equal batches (one process runs them all). Ranks take contiguous runs of whole batches, in
    near-equal numbers, so every batch is the same tensor wherever it runs and every per-batch result
    (forward, XᵀX) is the one-process one: the checkpoint does not depend on the world size.
    """
    if num_samples < world_size:
        raise CalibrationDataError(f"{num_samples} calibration samples cannot be split across {world_size} ranks")
    sizes = near_equal_shares(num_samples, math.ceil(num_samples / batch_size))
    if len(sizes) < world_size:
        raise CalibrationDataError(
            f"{num_samples} samples in batches of {batch_size} make {len(sizes)} forward calls, fewer than the "
            f"{world_size} ranks: use a batch size (--batch-size) of {num_samples // world_size} or less "
            "(each rank runs whole batches)"
        )
    starts = [0, *itertools.accumulate(sizes)]
    counts = near_equal_shares(len(sizes), world_size)
    first = sum(counts[:rank])
    return [list(range(starts[b], starts[b + 1])) for b in range(first, first + counts[rank])]


def near_equal_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]
