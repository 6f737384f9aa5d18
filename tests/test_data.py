"""distill.data: layouts, loss masks, truncation, packing (checked against a real model), collator, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from tokenizers import processors

from distill.data import (
    DataError,
    DataReport,
    DistillCollator,
    detect_format,
    packed_attention_mask,
    prepare_dataset,
)
from distill.data.packing import best_fit_decreasing
from distill.testing import CHATML_TEMPLATE, tiny_llama, tiny_qwen2

EOS = "<|im_end|>"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "How many legs does a spider have?"},
    {"role": "assistant", "content": "Eight legs."},
]


def loss_runs(row: dict, tokenizer) -> list[str]:
    """Decode each maximal run of loss-carrying tokens of a row (labels must equal the ids there)."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def prepare(rows: list[dict], tokenizer, **kwargs) -> tuple[Dataset, DataReport]:
    kwargs.setdefault("max_length", 128)
    return prepare_dataset(Dataset.from_list(rows), tokenizer, **kwargs)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer made to put bos in front of plain text, like Llama's."""
    with_bos = copy.deepcopy(tokenizer)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)]
    )
    return with_bos


# --- layouts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages", "id"], "messages"),
        (["prompt", "completion", "source"], "prompt_completion"),
        (["text"], "text"),
        (["input_ids"], "tokenized"),
        (["input_ids", "labels", "prompt_input_ids", "messages"], "tokenized"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_unknown_names_columns_and_layouts():
    with pytest.raises(DataError, match=r"No known row layout in columns \['question'\].*`messages`.*`input_ids`"):
        detect_format(["question"])
    with pytest.raises(DataError, match="needs a `completion` column"):
        detect_format(["prompt"])


# --- what carries loss -----------------------------------------------------------------------------------


def test_messages_loss_on_assistant_turns_only(tokenizer):
    rows, report = prepare([{"messages": CHAT, "extra": 1}], tokenizer)
    row = rows[0]
    assert set(rows.column_names) == {"input_ids", "labels", "prompt_input_ids"}
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert loss_runs(row, tokenizer) == ["Paris." + EOS, "Eight legs." + EOS]
    expected_prompt = tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["prompt_input_ids"]) == expected_prompt
    assert report.format == "messages" and report.num_loss_tokens == sum(label != -100 for label in row["labels"])


def test_messages_without_completion_only_loss(tokenizer):
    rows, _ = prepare([{"messages": CHAT}], tokenizer, completion_only_loss=False)
    assert rows[0]["labels"] == rows[0]["input_ids"]


def test_prompt_completion_strings(tokenizer):
    rows, _ = prepare([{"prompt": "What is 2+2?", "completion": " 4"}], tokenizer)
    assert loss_runs(rows[0], tokenizer) == [" 4" + EOS]
    assert rows[0]["prompt_input_ids"] == tokenizer("What is 2+2?")["input_ids"]
    assert tokenizer.decode(rows[0]["input_ids"]) == "What is 2+2? 4" + EOS


def test_prompt_completion_token_straddling_the_boundary_is_completion(tokenizer):
    # "F|rance": BPE makes " Fr" across the boundary; the model must produce it, so it carries loss.
    prompt, completion = "The capital of F", "rance is Paris."
    assert " Fr" in [tokenizer.decode([token]) for token in tokenizer(prompt + completion)["input_ids"]]
    rows, _ = prepare([{"prompt": prompt, "completion": completion}], tokenizer)
    assert loss_runs(rows[0], tokenizer) == [" France is Paris." + EOS]


def test_prompt_completion_eos_not_doubled(tokenizer):
    rows, _ = prepare([{"prompt": "Say hi.", "completion": " Hi." + EOS}], tokenizer)
    assert loss_runs(rows[0], tokenizer) == [" Hi." + EOS]


def test_prompt_completion_conversational(tokenizer):
    rows, _ = prepare([{"prompt": CHAT[:4], "completion": CHAT[4:]}], tokenizer)
    assert loss_runs(rows[0], tokenizer) == ["Eight legs." + EOS]  # the prompt's assistant turn is context
    expected_prompt = tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(rows[0]["prompt_input_ids"]) == expected_prompt


def test_text_all_tokens_carry_loss(tokenizer):
    rows, _ = prepare([{"text": "The quick brown fox."}, {"text": "Ends with eos." + EOS}], tokenizer)
    assert "prompt_input_ids" not in rows.column_names
    for row, text in zip(rows, ["The quick brown fox." + EOS, "Ends with eos." + EOS], strict=True):
        assert row["labels"] == row["input_ids"] and tokenizer.decode(row["input_ids"]) == text


def test_bos_added_to_plain_rows_when_the_tokenizer_adds_it(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    rows, _ = prepare([{"prompt": "Hi.", "completion": " Hello."}], bos_tokenizer)
    assert rows[0]["input_ids"][0] == bos and rows[0]["prompt_input_ids"][0] == bos
    assert rows[0]["labels"][0] == -100 and loss_runs(rows[0], bos_tokenizer) == [" Hello." + EOS]
    rows, _ = prepare([{"text": "<|endoftext|>Already there."}], bos_tokenizer)
    assert rows[0]["input_ids"].count(bos) == 1
    rows, _ = prepare([{"messages": CHAT}], bos_tokenizer)  # chat renders carry their own special tokens
    assert bos not in rows[0]["input_ids"]


def test_tokenized_rows_taken_as_is(tokenizer):
    rows, report = prepare(
        [
            {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13], "prompt_input_ids": [10, 11]},
            {"input_ids": [20, 21, 22], "labels": None, "prompt_input_ids": [20]},
        ],
        tokenizer,
    )
    assert rows[0] == {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13], "prompt_input_ids": [10, 11]}
    assert rows[1]["labels"] == [20, 21, 22]
    assert report.format == "tokenized" and report.num_tokens == 7 and report.num_loss_tokens == 4


def test_num_proc_gives_the_same_rows(tokenizer):
    rows = [{"messages": [CHAT[1], {"role": "assistant", "content": f"Answer {i}."}]} for i in range(12)]
    one, _ = prepare(rows, tokenizer)
    two, _ = prepare(rows, tokenizer, num_proc=2)
    assert one[:] == two[:]


# --- truncation and report -----------------------------------------------------------------------------


def test_truncation_counted_and_report(tokenizer):
    long_text = "The quick brown fox jumps over the lazy dog. " * 10
    rows, report = prepare([{"text": long_text}, {"text": "Short."}, {"text": long_text}], tokenizer, max_length=16)
    short = len(tokenizer("Short.")["input_ids"]) + 1  # + eos
    assert [len(ids) for ids in rows["input_ids"]] == [16, short, 16]
    assert report.num_truncated == 2 and report.num_rows == 3 and report.num_tokens == 32 + short
    assert report.num_loss_tokens == 15 + 15 + short - 1  # each row's first label is never predicted
    expected = f"3 rows (text), 2 truncated to 16 tokens, {32 + short} tokens of which {29 + short} carry loss"
    assert str(report) == expected
    many = DataReport(1000, 3, 250_000, 120_000, 512, "messages", num_packed_rows=300)
    assert str(many) == (
        "1,000 rows (messages), 3 truncated to 512 tokens, 250,000 tokens of which 120,000 carry loss, "
        "packed into 300 rows"
    )


# --- errors ------------------------------------------------------------------------------------------------


def _rows_with_bad(bad: dict, good: dict, bad_at: tuple[int, ...], total: int = 8) -> list[dict]:
    return [bad if index in bad_at else good for index in range(total)]


GOOD_PC = {"prompt": "Hi.", "completion": " Hello."}


@pytest.mark.parametrize(
    ("bad", "good", "match"),
    [
        ({"prompt": "Hi.", "completion": "  \n"}, GOOD_PC, "2 rows \\(index 1, 5\\): the completion is empty"),
        ({"prompt": "Hi.", "completion": ""}, GOOD_PC, "2 rows \\(index 1, 5\\): the completion is empty"),
        ({"messages": CHAT[:2]}, {"messages": CHAT}, "2 rows \\(index 1, 5\\): there is no assistant turn"),
        (
            {"messages": [*CHAT[:2], {"role": "assistant", "content": " "}]},
            {"messages": CHAT},
            "2 rows \\(index 1, 5\\): an assistant turn has empty",
        ),
        ({"text": " "}, {"text": "Fine."}, "index 1, 5\\): the text is empty"),
        (
            {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            "2 rows \\(index 1, 5\\): no token carries loss",
        ),
        (
            {"input_ids": [5, 6, 7], "labels": [6, 7, -100]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            "index 1, 5\\): a label is neither -100 nor the token id.*unshifted",
        ),
        (
            {"input_ids": [5, 6, 9999], "labels": [5, 6, 9999]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            "index 1, 5\\): a token id is outside the tokenizer's vocabulary",
        ),
        (
            {"input_ids": [5, 6, 7], "labels": [5, 6]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            "index 1, 5\\): `labels` and `input_ids` have different lengths",
        ),
    ],
)
def test_bad_rows_named(tokenizer, bad, good, match):
    with pytest.raises(DataError, match=match):
        prepare(_rows_with_bad(bad, good, bad_at=(1, 5)), tokenizer)


def test_mixed_prompt_completion_types(tokenizer):
    rows = [{"prompt": [CHAT[1]], "completion": "Paris."}] * 8  # one Arrow column cannot mix the two per row
    match = r"8 rows \(index 0, 1, 2, 3, 4 and 3 more\): `prompt` and `completion` must both be strings or both"
    with pytest.raises(DataError, match=match):
        prepare(rows, tokenizer)


def test_prompt_too_long_lists_rows_and_lengths(tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    rows = [{"prompt": long_prompt if i % 2 else "Hi.", "completion": " Hello."} for i in range(16)]
    n = len(tokenizer(long_prompt)["input_ids"])
    match = rf"8 rows \(index 1: {n} tokens, 3: {n} tokens, .*and 3 more\): the prompt alone.*raise max_length"
    with pytest.raises(DataError, match=match):
        prepare(rows, tokenizer, max_length=n)
    _, report = prepare(rows, tokenizer, max_length=n + 1)  # one completion token fits: truncated, accepted
    assert report.num_truncated == 8


def test_several_problems_reported_together(tokenizer):
    rows = [GOOD_PC, {"prompt": "Hi.", "completion": ""}, GOOD_PC, {"prompt": "x " * 100, "completion": "y"}]
    match = r"(?s)1 row \(index 1\): the completion is empty.*1 row \(index 3: \d+ tokens\)"
    with pytest.raises(DataError, match=match):
        prepare(rows, tokenizer, max_length=32)


@pytest.mark.parametrize(
    ("rows", "packing"),
    [([{"text": "Some text."}], False), ([GOOD_PC], True), ([{"input_ids": [5, 6], "labels": [5, 6]}], False)],
)
def test_need_prompts(tokenizer, rows, packing):
    with pytest.raises(DataError, match=r"on-policy distillation \(lmbda>0\) and seq_kd need prompts"):
        prepare(rows, tokenizer, need_prompts=True, packing=packing)


def test_need_prompts_checks_generation_prompt_length(tokenizer):
    rows, _ = prepare([{"messages": CHAT}], tokenizer, need_prompts=True)
    prompt_length = len(rows[0]["prompt_input_ids"])
    prepare([{"messages": CHAT}], tokenizer, max_length=prompt_length + 1, need_prompts=True)
    with pytest.raises(DataError, match=f"index 0: {prompt_length} tokens"):
        prepare([{"messages": CHAT}], tokenizer, max_length=prompt_length, need_prompts=True)


def test_chat_without_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="tokenizer has no `chat_template`.*set one"):
        prepare([{"messages": CHAT}], plain)


def test_template_not_prefix_stable(tokenizer):
    unstable = copy.deepcopy(tokenizer)
    # Marks the last message: rendering a prefix of the conversation is then not a prefix of the whole.
    unstable.chat_template = CHATML_TEMPLATE.replace("{% endfor %}", "{% if loop.last %}END{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="index 0\\): the chat template is not prefix-stable"):
        prepare([{"messages": CHAT}], unstable)


def test_conversation_starting_with_assistant(tokenizer):
    with pytest.raises(DataError, match="starts with an assistant turn"):
        prepare([{"messages": CHAT[2:3]}], tokenizer)


def test_empty_dataset_and_tiny_max_length(tokenizer):
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(Dataset.from_dict({"text": []}), tokenizer, max_length=16)
    with pytest.raises(DataError, match="max_length=1 is too small"):
        prepare([{"text": "a"}], tokenizer, max_length=1)


# --- packing -----------------------------------------------------------------------------------------------


def test_best_fit_decreasing():
    bins = best_fit_decreasing([5, 3, 8, 2, 7, 1], capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 7, 1][i] for i in b) <= 10 for b in bins) and len(bins) == 3
    assert bins == best_fit_decreasing([5, 3, 8, 2, 7, 1], capacity=10)  # deterministic


DOCS = [
    "The teacher is a large model.",
    "A spider has eight legs.",
    "Jupiter is the largest planet.",
    "def add(a, b):\n    return a + b",
    "Bonjour.",
    "The quick brown fox jumps over the lazy dog.",
    "Sunlight scatters off air molecules.",
]


def test_packing_rows_positions_and_labels(tokenizer):
    unpacked, _ = prepare([{"text": doc} for doc in DOCS], tokenizer, max_length=32)
    packed, report = prepare([{"text": doc} for doc in DOCS], tokenizer, max_length=32, packing=True)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    assert report.num_packed_rows == len(packed) < len(DOCS)
    documents = []
    for row in packed:
        assert len(row["input_ids"]) <= 32 and len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        for start, end in _documents(row):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == -100  # never predicted from the previous document
            documents.append(row["input_ids"][start:end])
    assert sorted(documents) == sorted(unpacked["input_ids"])


def _documents(row: dict) -> list[tuple[int, int]]:
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
    return list(zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_packed_rows_give_the_logits_of_documents_run_alone(tokenizer, build, attention):
    packed, _ = prepare([{"text": doc} for doc in DOCS], tokenizer, max_length=40, packing=True)
    batch = DistillCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)(list(packed))
    assert max(len(_documents(row)) for row in packed) >= 3 and batch["num_input_tokens"] < batch["input_ids"].numel()
    model = build(vocab_size=len(tokenizer))
    model.set_attn_implementation(attention)
    # The 4D mask a caller that keeps the KV cache on can pass instead (bool for sdpa, additive for eager).
    mask_dtype = torch.bool if attention == "sdpa" else torch.float32
    with torch.no_grad():
        # What the trainer passes: the collator's tensors, with use_cache=False.
        inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits
        masked_logits = model(
            input_ids=batch["input_ids"],
            attention_mask=packed_attention_mask(batch["position_ids"], mask_dtype),
            position_ids=batch["position_ids"],
        ).logits
        checked = 0
        for row_index, row in enumerate(packed):
            for start, end in _documents(row):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
                torch.testing.assert_close(logits[row_index, start:end], alone, atol=1e-5, rtol=0)
                torch.testing.assert_close(masked_logits[row_index, start:end], alone, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(DOCS)
    assert torch.isfinite(logits).all() and torch.isfinite(masked_logits).all()  # padding included


# --- collator ----------------------------------------------------------------------------------------------


def test_collator_pads_right_and_prompts_left(tokenizer):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_input_ids": [5], "extra": "ignored"},
        {"input_ids": [8, 9], "labels": [-100, 9], "prompt_input_ids": [8, 10, 11]},
    ]
    batch = DistillCollator(pad_token_id=3)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["prompt_input_ids"].tolist() == [[3, 3, 5], [8, 10, 11]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_pad_to_multiple_of_and_prepared_rows(tokenizer):
    rows, _ = prepare([{"messages": CHAT}, {"messages": CHAT[:3]}], tokenizer)
    batch = DistillCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=16)(list(rows))
    longest = max(len(ids) for ids in rows["input_ids"])
    assert batch["input_ids"].shape == (2, -(-longest // 16) * 16)
    assert batch["prompt_input_ids"].shape[1] % 16 == 0
    assert batch["attention_mask"].sum().item() == sum(len(ids) for ids in rows["input_ids"])


def test_collator_packed_rows(tokenizer):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
    ]
    batch = DistillCollator(pad_token_id=3)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "num_input_tokens"}
    assert batch["attention_mask"] is None  # transformers builds the document mask from position_ids
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # padding: a document of its own
    assert batch["num_input_tokens"].item() == 6
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, -100, -100]]
    block = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    allowed = packed_attention_mask(batch["position_ids"])
    assert allowed.shape == (2, 1, 4, 4) and allowed.squeeze(1).int().tolist() == [block, block]
    additive = packed_attention_mask(batch["position_ids"], torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and torch.equal(additive == 0, allowed)
    with pytest.raises(DataError, match="packed and unpacked"):
        DistillCollator(pad_token_id=3)([rows[0], {"input_ids": [1], "labels": [1]}])
