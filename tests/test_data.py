"""Calibration data: loading local text sources, building samples, splitting them across ranks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptq_fsdp.data import CalibrationDataError, CalibrationSet, build_calibration, load_texts, rank_batches

CHATS = [
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Who wrote Emma?"},
        {"role": "assistant", "content": "Austen."},
    ],
    [
        {"role": "user", "content": "Is Highbury a village?"},
        {"role": "assistant", "content": "Yes."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def emma_text(austen) -> str:
    return (austen / "emma.txt").read_text()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The documents' tokens, each followed by EOS (built independently of the package)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids)


# --------------------------------------------------------------------------------------------- load_texts


def test_txt_file_is_one_document(tmp_path):
    text = "Emma Woodhouse, handsome, clever, and rich.\n\nSecond paragraph\n  with odd   spacing  \n\n\n"
    path = tmp_path / "one.txt"
    path.write_text(text)
    assert load_texts(str(path)) == [text]


def test_jsonl_text_column_skips_blank_rows(tmp_path):
    rows = [{"body": "first doc", "id": 1}, {"body": "  ", "id": 2}, {"body": "", "id": 3}, {"body": "third", "id": 4}]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    assert load_texts(str(path), text_column="body") == ["first doc", "third"]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma", "delta epsilon zeta"], "n": [1, 2, 3]}), path)
    assert load_texts(str(path)) == ["alpha beta", "gamma", "delta epsilon zeta"]


def test_directory_of_txt_files_one_document_each(tmp_path):
    (tmp_path / "b.txt").write_text("second file\nline 2\n")
    (tmp_path / "a.txt").write_text("first file\n\nmore\n")
    (tmp_path / "notes.md").write_text("not calibration data")  # not a known kind: ignored
    assert sorted(load_texts(str(tmp_path))) == ["first file\n\nmore\n", "second file\nline 2\n"]


def test_directory_of_jsonl_files(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "part-1.jsonl", [{"text": "three"}])
    assert sorted(load_texts(str(tmp_path))) == ["one", "three", "two"]


def test_chat_messages_rendered_with_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    texts = load_texts(str(path), tokenizer=tokenizer)
    assert texts == [tokenizer.apply_chat_template(m, tokenize=False) for m in CHATS]
    # Really rendered (role markers and contents present), not a repr of the rows.
    assert texts[0].count("<|im_start|>") == 3
    assert "<|im_start|>user\nWho wrote Emma?<|im_end|>" in texts[0]
    assert "Austen." in texts[0] and "Is Highbury a village?" in texts[1]


def test_chat_messages_without_tokenizer_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    with pytest.raises(CalibrationDataError, match="chat template"):
        load_texts(str(path))


def test_missing_column_error_names_columns(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"content": "hello", "title": "t"}])
    with pytest.raises(CalibrationDataError) as info:
        load_texts(str(path))
    message = str(info.value)
    assert "'text'" in message and "'messages'" in message
    assert "content" in message and "title" in message  # the columns that do exist


def test_custom_text_column_missing(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(CalibrationDataError, match="'body'"):
        load_texts(str(path), text_column="body")


def test_mixed_file_kinds_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json text"}])
    with pytest.raises(CalibrationDataError) as info:
        load_texts(str(tmp_path))
    assert ".jsonl" in str(info.value) and ".txt" in str(info.value)


def test_directory_without_data_files_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("nothing to calibrate on")
    with pytest.raises(CalibrationDataError, match="none"):
        load_texts(str(tmp_path))


def test_unknown_single_file_kind_is_an_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CalibrationDataError, match=r"\.csv"):
        load_texts(str(path))


# ------------------------------------------------------------------------------------ build_calibration


def test_pack_shape_mask_and_slices_of_stream(tokenizer, emma_text):
    texts = [emma_text[:6000], emma_text[6000:9000]]
    calib = build_calibration(texts, tokenizer, num_samples=6, max_seq_length=48, seed=3)
    assert isinstance(calib, CalibrationSet) and len(calib) == 6
    assert calib.input_ids.shape == (6, 48) and calib.input_ids.dtype == torch.long
    assert calib.attention_mask.shape == (6, 48)
    assert bool((calib.attention_mask == 1).all())

    stream = token_stream(tokenizer, texts)
    windows = stream.unfold(0, 48, 1)  # every contiguous slice of 48 tokens
    offsets = []
    for row in calib.input_ids:
        hits = (windows == row).all(dim=1).nonzero().flatten().tolist()
        assert hits, "a calibration row is not a contiguous slice of the token stream"
        offsets.append(hits[0])
    assert len(set(offsets)) == 6, "calibration rows repeat"
    # Slices never overlap: each token of the stream is used at most once.
    offsets.sort()
    assert all(b - a >= 48 for a, b in itertools.pairwise(offsets))


def test_pack_joins_documents_with_eos(tokenizer):
    texts = ["one two three four five six seven", "eight nine ten eleven twelve"]
    stream = token_stream(tokenizer, texts)
    calib = build_calibration(texts, tokenizer, num_samples=1, max_seq_length=stream.numel(), seed=0)
    assert torch.equal(calib.input_ids[0], stream)
    assert int((calib.input_ids[0] == tokenizer.eos_token_id).sum()) == 2


def test_pack_deterministic_per_seed(tokenizer, emma_text):
    texts = [emma_text[:20000]]
    kwargs = dict(num_samples=8, max_seq_length=32)
    a = build_calibration(texts, tokenizer, seed=7, **kwargs)
    b = build_calibration(texts, tokenizer, seed=7, **kwargs)
    c = build_calibration(texts, tokenizer, seed=8, **kwargs)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_pack_too_little_text_reports_token_count(tokenizer):
    text = "A very short calibration text."
    tokens = len(tokenizer.encode(text, add_special_tokens=False)) + 1  # + EOS separator
    with pytest.raises(CalibrationDataError) as info:
        build_calibration([text], tokenizer, num_samples=4, max_seq_length=tokens)
    message = str(info.value)
    assert f"{tokens} tokens" in message
    assert "4" in message


@pytest.mark.parametrize("num_samples, max_seq_length", [(0, 16), (4, 0), (-1, 8)])
def test_non_positive_sizes_are_errors(tokenizer, num_samples, max_seq_length):
    with pytest.raises(CalibrationDataError, match="positive"):
        build_calibration(["some text " * 50], tokenizer, num_samples=num_samples, max_seq_length=max_seq_length)


def test_no_pack_pads_right_and_masks_exactly_padding(tokenizer):
    texts = [
        "Short one.",
        "A somewhat longer document about Highbury and its inhabitants, their visits and their letters.",
        "Mr. Knightley",
        # Ends with the pad token (<|im_end|> is SmolLM2's pad and EOS): it must stay unmasked.
        "<|im_start|>user\nHello<|im_end|>",
        " ".join(["word"] * 200),  # longer than max_seq_length: truncated
    ]
    max_len = 40
    docs = [tokenizer.encode(t, add_special_tokens=False)[:max_len] for t in texts]
    assert docs[3][-1] == tokenizer.pad_token_id
    calib = build_calibration(texts, tokenizer, num_samples=len(texts), max_seq_length=max_len, pack=False, seed=1)

    assert calib.input_ids.shape == (len(texts), max_len)  # longest (truncated) doc sets the width
    remaining = [list(d) for d in docs]
    for ids, mask in zip(calib.input_ids.tolist(), calib.attention_mask.tolist(), strict=True):
        length = sum(mask)
        assert mask == [1] * length + [0] * (max_len - length), "mask is not ones then zeros (right padding)"
        assert ids[length:] == [tokenizer.pad_token_id] * (max_len - length)
        assert ids[:length] in remaining, "unmasked tokens are not one of the (truncated) documents"
        remaining.remove(ids[:length])
    assert remaining == []  # each document used exactly once


def test_no_pack_width_is_longest_chosen_document(tokenizer):
    texts = ["one", "one two", "one two three four"]
    calib = build_calibration(texts, tokenizer, num_samples=3, max_seq_length=64, pack=False)
    longest = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    assert calib.input_ids.shape == (3, longest)
    assert sorted(calib.attention_mask.sum(dim=1).tolist()) == sorted(
        len(tokenizer.encode(t, add_special_tokens=False)) for t in texts
    )


def test_no_pack_deterministic_per_seed(tokenizer):
    texts = [f"Document number {i} " * (i + 1) for i in range(20)]
    a = build_calibration(texts, tokenizer, num_samples=5, max_seq_length=32, pack=False, seed=11)
    b = build_calibration(texts, tokenizer, num_samples=5, max_seq_length=32, pack=False, seed=11)
    c = build_calibration(texts, tokenizer, num_samples=5, max_seq_length=32, pack=False, seed=12)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_no_pack_fewer_documents_than_samples(tokenizer):
    with pytest.raises(CalibrationDataError, match="2 non-empty documents"):
        build_calibration(["first", "second", ""], tokenizer, num_samples=3, max_seq_length=16, pack=False)


def test_calibration_set_batch_and_save_load(tmp_path, tokenizer, emma_text):
    calib = build_calibration([emma_text[:5000]], tokenizer, num_samples=4, max_seq_length=16)
    ids, mask = calib.batch([2, 0])
    assert torch.equal(ids, calib.input_ids[[2, 0]]) and torch.equal(mask, calib.attention_mask[[2, 0]])
    calib.save(tmp_path / "calib.pt")
    loaded = CalibrationSet.load(tmp_path / "calib.pt")
    assert torch.equal(loaded.input_ids, calib.input_ids)
    assert torch.equal(loaded.attention_mask, calib.attention_mask)


# ------------------------------------------------------------------------------------------ rank_batches

GRID = [(n, world, batch) for n in range(1, 14) for world in range(1, 5) for batch in range(1, 5) if n >= world]


@pytest.mark.parametrize("num_samples, world_size, batch_size", GRID)
def test_rank_batches_are_the_one_process_batches(num_samples, world_size, batch_size):
    """Whatever the world size, the forward calls are the one-process ones (ceil(n / batch_size)
    near-equal batches in order), each rank taking a contiguous run of whole batches, near-equal in
    number; fewer batches than ranks is refused."""
    one_process = rank_batches(num_samples, 0, 1, batch_size)
    assert [i for batch in one_process for i in batch] == list(range(num_samples))
    assert len(one_process) == -(-num_samples // batch_size)
    assert max(map(len, one_process)) - min(map(len, one_process)) <= 1 and max(map(len, one_process)) <= batch_size
    if len(one_process) < world_size:
        with pytest.raises(
            CalibrationDataError, match=rf"use a batch size \(--batch-size\) of {num_samples // world_size} or less"
        ):
            rank_batches(num_samples, 0, world_size, batch_size)
        return
    per_rank = [rank_batches(num_samples, rank, world_size, batch_size) for rank in range(world_size)]
    assert [batch for batches in per_rank for batch in batches] == one_process
    counts = [len(batches) for batches in per_rank]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_rank_batches_uneven_example():
    # 7 samples in batches of 2: [0, 1] [2, 3] [4, 5] [6]; on 3 ranks two batches, one, one.
    assert [rank_batches(7, r, 3, 2) for r in range(3)] == [[[0, 1], [2, 3]], [[4, 5]], [[6]]]


def test_rank_batches_single_rank_uses_near_equal_batches():
    assert rank_batches(10, 0, 1, 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("num_samples, world_size", [(1, 2), (3, 4), (0, 1)])
def test_rank_batches_fewer_samples_than_ranks(num_samples, world_size):
    with pytest.raises(CalibrationDataError, match=f"{num_samples} calibration samples"):
        rank_batches(num_samples, 0, world_size, 2)
