"""Chat data for fine-tuning: record layouts -> messages, labels from the rendered template (Qwen3's released template
and the shipped tokenizer's), the checked tokenised cache with one-line errors, and packed conversation rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from framework.config.load import ConfigError
from framework.data import DEMO_TOKENIZER_DIR, load_tokenizer
from framework.data.chat_dataset import ChatData, ChatSettings, build_chat_cache
from framework.data.chat_formats import ChatFields, ChatFormatError, to_messages
from framework.data.chat_rows import ChatRows
from framework.data.chat_template import IGNORE_INDEX, ChatRenderer, TemplateError
from framework.data.samples import StepBatchLoader

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """The shipped BPE with Qwen3's special and added tokens and Qwen3's released chat template, unchanged."""
    with open(os.path.join(FIXTURES, "qwen3_chat_template.json")) as f:
        spec = json.load(f)
    tok = load_tokenizer(DEMO_TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": spec["special_tokens"]})
    tok.add_tokens(spec["added_tokens"])
    tok.eos_token = spec["eos_token"]
    tok.chat_template = spec["chat_template"]
    return tok


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return load_tokenizer(DEMO_TOKENIZER_DIR)


def labelled_runs(tokenizer, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """Each maximal run of labelled tokens, decoded (an independent read of what the loss is on)."""
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    idx = np.flatnonzero(labels != IGNORE_INDEX)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []
    return [tokenizer.decode(ids[r]) for r in runs]


# ---- formats


def test_three_layouts_give_the_same_messages():
    fields = ChatFields()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": messages}, fields) == messages
    assert to_messages({"system": "S", "conversations": [{"from": "human", "value": "Q"},
                                                         {"from": "gpt", "value": "A"}]}, fields) == messages
    alpaca = to_messages({"system": "S", "instruction": "Q", "input": "", "output": "A"}, fields)
    assert alpaca == messages
    assert to_messages({"instruction": "Q", "input": "x", "output": "A"}, fields)[0]["content"] == "Q\n\nx"
    custom = ChatFields(format="messages", messages_field="dialog", role_field="speaker", content_field="text")
    assert to_messages({"dialog": [{"speaker": "user", "text": "Q"}]}, custom) == [{"role": "user", "content": "Q"}]
    # keys beyond role/content reach the template; nulls (Arrow fills every struct field) do not
    kept = to_messages({"messages": [{"role": "assistant", "content": None, "name": None,
                                      "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]}, fields)
    assert kept == [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
                                                                                      "arguments": "{}"}}]}]


@pytest.mark.parametrize("record, needle", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role 'alien'"),
    ({"messages": [{"role": "user", "content": 3}]}, "is a number, expected text"),
    ({"text": "x"}, "no 'messages', 'conversations' or 'instruction' field (fields found: text)"),
    ([1], "not an object"),
])
def test_format_errors_are_one_line(record, needle):
    with pytest.raises(ChatFormatError) as e:
        to_messages(record, ChatFields())
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- labels from the rendered template

QWEN3_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},  # before the last query: no thinking
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21C"},
    {"role": "assistant", "content": "Sunny and 21C."},
]
# What the assistant writes in each turn as Qwen3's template renders it (written out by hand from the template's
# rules: thinking dropped before the last user query, kept after it, an empty think block on the last turn)
QWEN3_EXPECTED = [
    "Hello!<|im_end|>",
    '<think>\nNeed the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>",
    "<think>\n\n</think>\n\nSunny and 21C.<|im_end|>",
]


def test_qwen3_template_labels_exactly_the_assistant_turns(qwen3_tokenizer):
    renderer = ChatRenderer(qwen3_tokenizer)
    assert renderer.eot == "<|im_end|>"
    ids, labels = renderer.encode(QWEN3_CONVERSATION)
    # the tokens are the template's own rendering, tokenised
    text = qwen3_tokenizer.apply_chat_template(QWEN3_CONVERSATION, tokenize=False)
    assert qwen3_tokenizer.decode(ids) == text
    assert labelled_runs(qwen3_tokenizer, ids, labels) == QWEN3_EXPECTED
    ids, labels = ChatRenderer(qwen3_tokenizer, loss_on="last").encode(QWEN3_CONVERSATION)
    assert labelled_runs(qwen3_tokenizer, ids, labels) == QWEN3_EXPECTED[-1:]


def test_qwen3_template_without_thinking(qwen3_tokenizer):
    """enable_thinking=false (chat.template_kwargs): the generation prompt then ends with the empty think block, so
    it is prompt, not label; an earlier turn's header is still found although it lacks that block."""
    renderer = ChatRenderer(qwen3_tokenizer, chat_template_kwargs={"enable_thinking": False})
    conversation = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": "B?"}, {"role": "assistant", "content": "No."}]
    ids, labels = renderer.encode(conversation)
    assert labelled_runs(qwen3_tokenizer, ids, labels) == ["Yes.<|im_end|>", "No.<|im_end|>"]


def test_shipped_template_every_turn_is_content_plus_end_of_turn(shipped_tokenizer):
    renderer = ChatRenderer(shipped_tokenizer)
    assert renderer.eot == shipped_tokenizer.eos_token
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": "It is 6, twice three."}]
    ids, labels = renderer.encode(conversation)
    assert labelled_runs(shipped_tokenizer, ids, labels) == [
        m["content"] + shipped_tokenizer.eos_token for m in conversation if m["role"] == "assistant"]


def test_failing_template_is_one_line(shipped_tokenizer):
    tok = load_tokenizer(DEMO_TOKENIZER_DIR)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
                         "{% endif %}{{ m.content + eos_token }}{% endfor %}")
    renderer = ChatRenderer(tok)
    with pytest.raises(TemplateError, match="the chat template fails: no tools here"):
        renderer.encode([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


# ---- the cache: every conversation checked before training


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def conversation(k: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "You count."}] if k % 2 else []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Count to {k + t}."},
                     {"role": "assistant", "content": " ".join(str(i) for i in range(k + t + 1))}]
    return {"messages": messages}


def test_cache_reads_every_format_and_is_reused(tmp_path, shipped_tokenizer):
    import datasets

    msgs = write_jsonl(tmp_path / "a.jsonl", [conversation(k) for k in range(5)])
    share = tmp_path / "b.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "yo"}]}]))
    datasets.Dataset.from_list([{"instruction": "Say x", "input": "", "output": "x"}] * 2).to_parquet(
        str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list([conversation(7, 2)]).save_to_disk(str(tmp_path / "saved"))
    paths = [msgs, str(share), str(tmp_path / "c.parquet"), str(tmp_path / "saved")]
    out, summary = build_chat_cache(paths, shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))
    assert summary["conversations"] == 5 + 1 + 2 + 1 and summary["without_assistant"] == 0
    data = ChatData(out)
    ids, labels = data.conversation(6, 10_000)  # the first Alpaca row
    assert labelled_runs(shipped_tokenizer, ids, labels) == ["x" + shipped_tokenizer.eos_token]
    again, _ = build_chat_cache(paths, shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))
    assert again == out
    other, _ = build_chat_cache(paths, shipped_tokenizer, ChatSettings(loss_on="last"), str(tmp_path / "cache"))
    assert other != out  # the settings are part of the key


def test_cache_errors_name_file_and_line(tmp_path, shipped_tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(1), {"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(ConfigError, match=rf"^data.paths: {bad}:2: message 0: unknown role 'wizard'"):
        build_chat_cache([bad], shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))
    none = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "hello?"}]}])
    with pytest.raises(ConfigError, match=rf"^data.paths: {none}:1: no conversation has an assistant message"):
        build_chat_cache([none], shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))
    failing = load_tokenizer(DEMO_TOKENIZER_DIR)
    failing.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
                             "{% endif %}{{ m.content + eos_token }}{% endfor %}")
    tools = write_jsonl(tmp_path / "tools.jsonl", [conversation(1), conversation(2),
                                                   {"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(ConfigError, match=rf"^data.paths: {tools}:3: the chat template fails: no tools here$"):
        build_chat_cache([tools], failing, ChatSettings(), str(tmp_path / "cache"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="a plain text file"):
        build_chat_cache([str(text)], shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))


# ---- rows


@pytest.fixture()
def chat_data(tmp_path, shipped_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(k % 10 if k % 7 else 40, 1 + k % 3)
                                                for k in range(40)])
    return ChatData(build_chat_cache([path], shipped_tokenizer, ChatSettings(), str(tmp_path / "cache"))[0])


def test_rows_pack_whole_conversations(chat_data, shipped_tokenizer):
    seq_len = 96
    rows = ChatRows(chat_data, seq_len, 4, seed=0, shuffle=True, pad_id=shipped_tokenizer.pad_token_id)
    lengths = chat_data.lengths()
    assert rows.truncated == int((lengths > seq_len).sum()) > 0 and rows.dropped == 0
    seen = 0
    for g in range(24):
        ids, pos, labels = rows.row(g)
        assert len(ids) == len(pos) == len(labels) == seq_len
        starts = np.flatnonzero(pos == 0)
        assert np.all(labels[starts] == IGNORE_INDEX)
        for a, b in zip(starts, list(starts[1:]) + [seq_len]):
            assert np.array_equal(pos[a:b], np.arange(b - a))  # position ids restart per conversation
            segment = ids[a:b]
            if np.all(segment == shipped_tokenizer.pad_token_id):
                assert np.all(labels[a:b] == IGNORE_INDEX)  # padding learns nothing
            else:
                seen += 1
                text = shipped_tokenizer.decode(segment)
                assert text.startswith("<|") and (labels[a:b] != IGNORE_INDEX).any()
    assert seen > 24  # rows hold more than one conversation
    drop = ChatRows(chat_data, seq_len, 4, seed=0, shuffle=True, pad_id=0, overlong="drop")
    assert drop.dropped == rows.truncated and len(drop.eligible) == len(rows.eligible) - rows.truncated


def test_rows_resume_and_world_size_independence(chat_data):
    def loader(world, rank, state=None):
        rows = ChatRows(chat_data, 64, 8, seed=3, shuffle=True, pad_id=0)
        it = StepBatchLoader(rows, 8, 2, rank, world)
        if state:
            it.load_state(state)
        return it

    one = loader(1, 0)
    steps = [[next(one) for _ in range(4)] for _ in range(3)]
    two = [loader(2, r) for r in range(2)]
    for it in two:
        for _ in range(2 * 2):
            next(it)
    state = two[0].global_state([it.local_positions() for it in two])
    resumed = loader(1, 0, state)
    for k in range(4):  # step 3 of the single-process run, after a 2-process run saved at step 2
        b = next(resumed)
        assert all(np.array_equal(b[key], steps[2][k][key]) for key in b)


# ---- the plan: what each task refuses


@pytest.mark.parametrize("task, overrides, needle", [
    ("pretrain", ["chat.loss_on=last"], "the chat section configures chat data for launch/finetune.py"),
    ("finetune", ["data.synthetic=true"], "data.synthetic=true is for pretraining"),
    ("finetune", ["chat.template=/nonexistent.jinja"], "chat.template /nonexistent.jinja is not a file"),
])
def test_plan_refuses_what_the_task_cannot_use(task, overrides, needle):
    from framework.config import load_run_config
    from framework.config.plan import check_task

    cfg = load_run_config(os.path.join(os.path.dirname(FIXTURES), "..", "..", "model_configs", "tiny.yaml"),
                          overrides)
    with pytest.raises(ConfigError, match=needle):
        check_task(cfg, task)


def test_plan_tokenises_the_chat_data_before_any_work(tmp_path):
    from framework.config import load_run_config
    from framework.config.plan import resolve_plan

    data = write_jsonl(tmp_path / "c.jsonl", [conversation(k) for k in range(8)])
    cfg = load_run_config(os.path.join(os.path.dirname(FIXTURES), "..", "..", "model_configs", "tiny.yaml"),
                          [f"data.paths=[{data}]", f"train.output_dir={tmp_path / 'out'}"])
    plan = resolve_plan(cfg, 1, check_corpus=True, task="finetune")
    assert plan.task == "finetune"
    assert any("8 conversations" in line and "assistant tokens" in line for line in plan.notes)
    assert len(os.listdir(tmp_path / "out" / "data_cache" / "chat")) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "?"}]}])
    with pytest.raises(ConfigError, match=f"data.paths: {bad}:1: no conversation has an assistant message"):
        resolve_plan(cfg.model_copy(update={"data": cfg.data.model_copy(update={"paths": [bad]})}), 1,
                     check_corpus=True, task="finetune")
