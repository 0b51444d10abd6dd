"""framework/data: every input format, the packed layout against an independent reconstruction, rank sharding,
determinism, exact resume (mid-document and across epochs), the demo corpus and tokenizer, and every one-line error.

All with the real shipped demo tokenizer and real files written with json, pyarrow and datasets."""

from __future__ import annotations

import json
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, processors

from framework.data import DEMO_TOKENIZER_DIR, PackedDataLoader, build_demo_corpus, load_tokenizer
from framework.data.order import epoch_order, rank_documents
from framework.config.load import ConfigError
from framework.data import sources
from framework.data.sources import check_corpus, open_corpus
from framework.data.stream import DocumentStream
from framework.data.tokenizer import encode_documents

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_TOKENIZER_DIR)


def doc_texts(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Distinct documents of very different lengths (one empty, some longer than a row)."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        k = 0 if i == 3 else int(rng.integers(1, max_words))
        texts.append(f"doc {i}:" + "".join(" " + WORDS[j] for j in rng.integers(0, len(WORDS), k)))
    return texts


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return str(path)


def doc_tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def take(loader, num_batches: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(num_batches)]


def flat(batches, key="input_ids") -> list[int]:
    return torch.cat([b[key].reshape(-1) for b in batches]).tolist()


def reconstruct(docs: list[list[int]], seq_len: int, num_rows: int):
    """Independent reference: rows of the doc stream (cycled) with positions counted token by token."""
    stream, start_flags = [], []
    while len(stream) < seq_len * num_rows:
        for d in docs:
            stream += d
            start_flags += [True] + [False] * (len(d) - 1)
    ids, pos, labels = [], [], []
    for r in range(num_rows):
        row_ids, row_pos, row_labels, p = [], [], [], 0
        for j in range(r * seq_len, (r + 1) * seq_len):
            p = 0 if (start_flags[j] or j == r * seq_len) else p + 1
            row_ids.append(stream[j])
            row_pos.append(p)
            row_labels.append(-100 if p == 0 else stream[j])
        ids.append(row_ids)
        pos.append(row_pos)
        labels.append(row_labels)
    return ids, pos, labels


def loader_for(paths, tok, tmp_path, **kw):
    args = dict(seq_len=16, micro_batch_size=2, dp_rank=0, dp_world=1, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return PackedDataLoader(paths, tok, **args)


# ------------------------------------------------------------------------------------------------------------ formats


def _save_dataset(tmp_path, texts):
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(path))
    return [str(path)], texts


def _save_dataset_dict(tmp_path, texts):
    path = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": ["unused"]})}).save_to_disk(str(path))
    return [str(path)], texts


def _parquet(tmp_path, texts):
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "a.parquet",
                   row_group_size=2)
    return [str(tmp_path / "a.parquet")], texts


def _json_array(tmp_path, texts):
    (tmp_path / "a.json").write_text(json.dumps([{"text": t, "x": 1} for t in texts]))
    return [str(tmp_path / "a.json")], texts


def _jsonl(tmp_path, texts):
    return [write_jsonl(tmp_path / "a.jsonl", texts)], texts


def _text_files(tmp_path, texts):
    (tmp_path / "one.txt").write_text(texts[0] + "\nsecond line\n")
    (tmp_path / "two.md").write_text("# " + texts[1])
    return [str(tmp_path / "two.md"), str(tmp_path / "one.txt")], ["# " + texts[1], texts[0] + "\nsecond line\n"]


def _folder(tmp_path, texts):
    """Recursive, sorted; other extensions, hidden entries and a saved dataset's own json files are not documents."""
    root = tmp_path / "corpus"
    (root / "b_sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    write_jsonl(root / "a.jsonl", texts[:2])
    (root / "b_sub" / "deeper" / "x.txt").write_text(texts[2])
    pq.write_table(pa.table({"text": texts[3:5]}), root / "b_sub" / "y.parquet")
    datasets.Dataset.from_dict({"text": texts[5:7]}).save_to_disk(str(root / "c_saved"))
    (root / "d.md").write_text(texts[7])
    (root / "notes.csv").write_text("text\nignored\n")
    write_jsonl(root / ".hidden" / "h.jsonl", ["hidden"])
    (root / ".skip.txt").write_text("hidden")
    return [str(root)], texts[:8]


@pytest.mark.parametrize("make", [_jsonl, _json_array, _parquet, _text_files, _folder, _save_dataset,
                                  _save_dataset_dict])
def test_each_format_yields_its_documents_in_order(make, tok, tmp_path):
    paths, texts = make(tmp_path, doc_texts(8))
    loader = loader_for(paths, tok, tmp_path, shuffle=False, seq_len=32, micro_batch_size=3)
    assert loader.num_docs == len(texts)
    expected = [t for text in texts for t in doc_tokens(tok, text)]
    got = flat(take(loader, 2 * len(expected) // (3 * 32) + 1))  # two epochs and a bit
    cycled = (expected * (len(got) // len(expected) + 1))[:len(got)]
    assert got == cycled
    # decoding the first epoch gives back the texts, joined by eos
    assert tok.decode(got[:len(expected)]) == "".join(t + tok.eos_token for t in texts)


def test_nothing_touches_the_network(tok, tmp_path, monkeypatch):
    """Loading the tokenizer and every format opens no socket (datasets.load_dataset would, for download counts)."""
    import socket
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    load_tokenizer(DEMO_TOKENIZER_DIR)
    paths, texts = _folder(tmp_path, doc_texts(8))
    next(loader_for(paths, tok, tmp_path))
    assert attempts == []


def test_tokenizer_special_tokens_are_not_added(tmp_path, tok):
    """A tokenizer whose post-processor prepends a BOS (<|pad|> here): the stream holds only text tokens and eos."""
    tdir = tmp_path / "bos_tok"
    shutil.copytree(DEMO_TOKENIZER_DIR, tdir)
    raw = Tokenizer.from_file(str(tdir / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 1)])
    raw.save(str(tdir / "tokenizer.json"))
    bos_tok = load_tokenizer(str(tdir))
    assert bos_tok("hello")["input_ids"][0] == 1  # it would add one by default
    texts = doc_texts(4)
    loader = loader_for([write_jsonl(tmp_path / "a.jsonl", texts)], bos_tok, tmp_path, shuffle=False)
    expected = [t for text in texts for t in doc_tokens(tok, text)]
    assert flat(take(loader, 1)) == expected[:32]
    assert 1 not in expected


# ----------------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_packed_rows_match_independent_reconstruction(seq_len, tok, tmp_path):
    texts = doc_texts(12, max_words=40)
    docs = [doc_tokens(tok, t) for t in texts]
    assert min(map(len, docs)) < seq_len < max(map(len, docs)) or seq_len == 64
    loader = loader_for([write_jsonl(tmp_path / "a.jsonl", texts)], tok, tmp_path, shuffle=False, seq_len=seq_len,
                        micro_batch_size=3)
    batches = take(loader, 10)
    for b in batches:
        assert set(b) == {"input_ids", "labels", "position_ids"}
        for v in b.values():
            assert v.dtype == torch.int64 and v.shape == (3, seq_len) and v.device.type == "cpu"
    ids, pos, labels = reconstruct(docs, seq_len, 30)
    assert torch.cat([b["input_ids"] for b in batches]).tolist() == ids
    assert torch.cat([b["position_ids"] for b in batches]).tolist() == pos
    assert torch.cat([b["labels"] for b in batches]).tolist() == labels
    all_pos = torch.cat([b["position_ids"] for b in batches])
    all_labels = torch.cat([b["labels"] for b in batches])
    assert (all_pos[:, 0] == 0).all()  # every row starts at 0
    assert ((all_labels == -100) == (all_pos == 0)).all()  # -100 exactly where a document or a row starts
    # every token after an eos starts a document
    all_ids = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    after_eos = torch.nonzero(all_ids[:-1] == tok.eos_token_id).squeeze(1) + 1
    assert (all_pos.reshape(-1)[after_eos] == 0).all()


def test_small_position_example():
    """Hand-written case: docs of 3, 5 and 2 tokens (eos included) in rows of 4."""
    from framework.data.packing import labels_for, pack_row
    segments = [np.array([1, 2, 3]), np.array([4])]  # doc A whole, doc B's first token
    ids, pos = pack_row(segments, 4)
    assert ids.tolist() == [1, 2, 3, 4] and pos.tolist() == [0, 1, 2, 0]
    ids, pos = pack_row([np.array([5, 6, 7, 8])], 4)  # doc B continues: restarts at 0 in its new row
    assert pos.tolist() == [0, 1, 2, 3]
    assert labels_for(np.array([1, 2, 3, 4]), np.array([0, 1, 2, 0])).tolist() == [-100, 2, 3, -100]


# ------------------------------------------------------------------------------------------------------------- ranks


def split_docs(stream: list[int], eos: int, count: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            docs.append(tuple(cur))
            cur = []
            if len(docs) == count:
                return docs
    raise AssertionError("stream too short")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_documents_that_cover_the_corpus(world, tok, tmp_path):
    texts = doc_texts(11)
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    docs = [tuple(doc_tokens(tok, t)) for t in texts]
    seen = []
    for rank in range(world):
        loader = loader_for([path], tok, tmp_path, dp_rank=rank, dp_world=world, seed=5)
        count = len(range(rank, len(texts), world))
        mine = split_docs(flat(take(loader, 20)), tok.eos_token_id, count)
        expected_ids = rank_documents(len(texts), 5, 0, True, rank, world)
        assert mine == [docs[i] for i in expected_ids]
        seen.append(set(mine))
    assert set.union(*seen) == set(docs)
    assert sum(len(s) for s in seen) == len(docs)


def test_epoch_order_is_pinned_and_a_permutation():
    # Pinned: a change here changes every run's data order (and breaks resuming old checkpoints).
    assert epoch_order(10, seed=0, epoch=0).tolist() == [0, 7, 8, 2, 5, 9, 4, 6, 3, 1]
    assert epoch_order(10, seed=0, epoch=1).tolist() == [9, 0, 6, 7, 4, 3, 2, 1, 8, 5]
    for seed, epoch in [(0, 0), (0, 1), (1, 0), (123, 7)]:
        order = epoch_order(1000, seed, epoch)
        assert sorted(order.tolist()) == list(range(1000))
    assert epoch_order(1000, 0, 0).tolist() != epoch_order(1000, 0, 1).tolist()
    assert epoch_order(1000, 0, 0).tolist() != epoch_order(1000, 1, 0).tolist()
    assert epoch_order(5, 0, 3, shuffle=False).tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------------ determinism


def test_same_arguments_same_batches_other_seed_other_order(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", doc_texts(20))
    a = take(loader_for([path], tok, tmp_path, seed=3), 12)
    b = take(loader_for([path], tok, tmp_path, seed=3), 12)
    c = take(loader_for([path], tok, tmp_path, seed=4), 12)
    assert flat(a) == flat(b) and flat(a, "position_ids") == flat(b, "position_ids")
    assert flat(a) != flat(c)
    assert sorted(flat(a)[:200]) != flat(a)[:200]


def test_epochs_advance_and_reshuffle(tok, tmp_path):
    texts = doc_texts(6)
    loader = loader_for([write_jsonl(tmp_path / "a.jsonl", texts)], tok, tmp_path, seq_len=8, micro_batch_size=1)
    total = sum(len(doc_tokens(tok, t)) for t in texts)
    epochs = [loader.epoch]
    stream = []
    while len(stream) < 3 * total:
        stream += next(loader)["input_ids"].reshape(-1).tolist()
        epochs.append(loader.epoch)
    assert epochs[0] == 0 and epochs == sorted(epochs) and epochs[-1] >= 2
    per_epoch = [stream[e * total:(e + 1) * total] for e in range(3)]
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) == sorted(per_epoch[2])  # each epoch: every doc once
    assert per_epoch[0] != per_epoch[1]  # in another order


def test_memo_and_window_paths_give_the_same_stream(tok, tmp_path):
    corpus = open_corpus([write_jsonl(tmp_path / "a.jsonl", doc_texts(30))], cache_dir=str(tmp_path / "c"))

    def encode(texts):
        return encode_documents(tok, texts, tok.eos_token_id)

    memo = DocumentStream(corpus, encode, seed=1, shuffle=True, dp_rank=1, dp_world=2)
    window = DocumentStream(corpus, encode, seed=1, shuffle=True, dp_rank=1, dp_world=2, window_docs=3,
                            memo_tokens=0)
    for n in [5, 100, 1, 3000, 77]:
        assert np.concatenate(memo.take(n)).tolist() == np.concatenate(window.take(n)).tolist()
        assert memo.position() == window.position()
    assert window._memo == {} and len(window._window) <= 3


# ------------------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
def test_resume_equals_uninterrupted_run(world, rank, tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", doc_texts(13))
    kw = dict(seq_len=24, micro_batch_size=2, dp_rank=rank, dp_world=world, seed=9)
    reference = take(loader_for([path], tok, tmp_path, **kw), 40)
    crossed_epoch = mid_document = False
    for k in [0, 1, 5, 11, 17, 29]:
        run = loader_for([path], tok, tmp_path, **kw)
        take(run, k)
        state = json.loads(json.dumps(run.state_dict()))
        assert len(json.dumps(state)) < 300
        crossed_epoch |= state["epoch"] > 0
        mid_document |= state["token_offset"] > 0
        resumed = loader_for([path], tok, tmp_path, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == state["epoch"] == run.epoch
        got = take(resumed, 40 - k)
        for key in ("input_ids", "labels", "position_ids"):
            assert flat(got, key) == flat(reference[k:], key), (k, key)
    assert crossed_epoch and mid_document  # the cases the parametrisation is meant to reach


def test_resume_with_other_row_shape_continues_the_token_stream(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", doc_texts(9))
    a = loader_for([path], tok, tmp_path, seq_len=16, micro_batch_size=2)
    take(a, 3)
    b = loader_for([path], tok, tmp_path, seq_len=8, micro_batch_size=1)
    b.load_state_dict(a.state_dict())
    assert flat(take(a, 1)) == flat(take(b, 4))


def test_state_dict_format(tok, tmp_path):
    loader = loader_for([write_jsonl(tmp_path / "a.jsonl", doc_texts(5))], tok, tmp_path, seed=2)
    assert loader.state_dict() == {"format": 1, "epoch": 0, "doc_index": 0, "token_offset": 0, "seed": 2,
                                   "shuffle": True, "dp_rank": 0, "dp_world": 1, "num_docs": 5}


# -------------------------------------------------------------------------------------------------------------- demo


def test_demo_corpus_and_tokenizer(tok, tmp_path):
    cache = str(tmp_path / "demo_cache")
    path = build_demo_corpus(cache)
    mtime = os.stat(path).st_mtime_ns
    assert build_demo_corpus(cache) == path and os.stat(path).st_mtime_ns == mtime  # built once
    assert os.listdir(cache) == [os.path.basename(path)]  # no temporary file left
    assert 500_000 < os.path.getsize(path) < 2_000_000
    with open(path) as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) > 500 and all(d["text"].strip() for d in docs)
    assert docs[0]["source"].startswith("abc")
    # The shipped tokenizer: byte-level (any text round-trips), small, eos and pad set.
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and len(tok) == 4096
    sample = "Any text: caf\u00e9 \u4e2d\u6587 \U0001f642 \t\x00"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample
    assert sum(os.path.getsize(os.path.join(DEMO_TOKENIZER_DIR, f)) for f in os.listdir(DEMO_TOKENIZER_DIR)) < 1 << 20
    loader = PackedDataLoader([path], tok, seq_len=128, micro_batch_size=4, dp_rank=0, dp_world=1, cache_dir=cache)
    batch = next(loader)
    assert batch["input_ids"].shape == (4, 128) and int(batch["input_ids"].max()) < len(tok)
    texts = [d["text"] for d in docs]
    num_tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    assert 3.0 < sum(len(t.encode()) for t in texts) / num_tokens < 5.0  # bytes per token: the BPE was trained here


# ------------------------------------------------------------------------------------------------------------ errors


def _empty_parquet(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    return [str(tmp_path / "e.parquet")]


ERROR_CASES = {
    "missing": (lambda p: [str(p / "nope.jsonl")], FileNotFoundError, r"nope.jsonl: data path does not exist"),
    "extension": (lambda p: [str(p / "a.csv")], ValueError, r"a.csv: unknown extension '.csv'; expected one of"),
    "no_field": (lambda p: [write_jsonl(p / "a.jsonl", ["x"], field="body")], ValueError,
                 r"a.jsonl:1: no field 'text' \(fields found: id, body\); set data.text_field"),
    "empty_jsonl": (lambda p: [str(p / "e.jsonl")], ValueError, r"e.jsonl: no documents"),
    "blank_jsonl": (lambda p: [str(p / "blank.jsonl")], ValueError, r"blank.jsonl: no documents"),
    "empty_parquet": (_empty_parquet, ValueError, r"e.parquet: no documents \(0 rows\)"),
    "empty_txt": (lambda p: [str(p / "e.txt")], ValueError, r"e.txt: no documents \(the file is empty\)"),
    "empty_folder": (lambda p: [str(p / "emptydir")], ValueError, r"emptydir: folder holds no data files"),
    "not_text": (lambda p: [str(p / "ints.jsonl")], ValueError, r"ints.jsonl:1: field 'text' holds a JSON number, not"),
    "nulls": (lambda p: [str(p / "nulls.jsonl")], ValueError, r"nulls.jsonl:2: field 'text' holds a JSON null, not"),
    "bad_json": (lambda p: [str(p / "bad.jsonl")], ValueError, r"bad.jsonl:1: not JSON \(Expecting value, column 1\)"),
    "bad_parquet": (lambda p: [str(p / "bad.parquet")], ValueError,
                    r"bad.parquet: cannot be read as parquet \(ArrowInvalid: "),
    "string_paths": (lambda p: str(p / "a.jsonl"), ValueError, r"paths must be a list"),
    "no_paths": (lambda p: [], ValueError, r"paths is empty"),
    "dict_no_train": (lambda p: [str(p / "dd")], ValueError, r"dd: saved DatasetDict has no 'train' split"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_named_errors(case, tok, tmp_path):
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "emptydir" / "sub").mkdir(parents=True)
    (tmp_path / "emptydir" / "ignored.csv").write_text("x")
    (tmp_path / "ints.jsonl").write_text('{"text": 1}\n')
    (tmp_path / "nulls.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": "b"}\n')
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "bad.parquet").write_text("not parquet")
    if case == "dict_no_train":
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    make, exc, match = ERROR_CASES[case]
    with pytest.raises(exc, match=match) as info:
        loader_for(make(tmp_path), tok, tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- check_corpus (content)

ELF_HEAD = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00"  # what `head -c 20 /bin/ls` shows


def corpus_error(paths, text_field="text") -> str:
    with pytest.raises(ConfigError) as info:
        check_corpus(paths, text_field)
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.paths: "), message
    return message


def test_check_corpus_passes_every_valid_format(tmp_path):
    paths, texts = _folder(tmp_path, doc_texts(8))
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "caf\u00e9 \u4e2d\u6587", "n": 1}]))
    (tmp_path / "one.txt").write_text("\u00e9" * 3000)  # multi-byte characters across read chunks
    assert check_corpus(paths + [str(tmp_path / "arr.json"), str(tmp_path / "one.txt")], "text") is None


def test_check_corpus_memo_rereads_only_changed_files(tmp_path, monkeypatch):
    """A restart does not scan a passed corpus again; a file changed since (size or time) is checked again."""
    good, other = tmp_path / "good.jsonl", tmp_path / "other.jsonl"
    good.write_text('{"text": "one"}\n')
    other.write_text('{"text": "two"}\n')
    memo = str(tmp_path / "cache" / "corpus_checked.json")
    check_corpus([str(good), str(other)], "text", memo=memo)
    read = []
    real = sources._check_file
    monkeypatch.setattr(sources, "_check_file", lambda f, field: (read.append(os.path.basename(f.path)),
                                                                  real(f, field)))
    check_corpus([str(good), str(other)], "text", memo=memo)
    assert read == []
    other.write_bytes(b'{"text": "t\x00o"}\n')  # changed: checked again, and the damage found
    with pytest.raises(ConfigError, match="other.jsonl:1: NUL byte"):
        check_corpus([str(good), str(other)], "text", memo=memo)
    assert read == ["other.jsonl"]
    with pytest.raises(ConfigError, match="good.jsonl:1: no field 'body'"):  # another text field: read again
        check_corpus([str(good)], "body", memo=memo)
    assert read == ["other.jsonl", "good.jsonl"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_binary_content_named_by_line_whatever_the_chunk(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_READ_CHUNK", chunk)
    head = "caf\u00e9\n\u4e2d\u6587\n".encode()  # 2 lines, 13 bytes, 2- and 3-byte characters
    (tmp_path / "nul.txt").write_bytes(head + b"ok\nbad \x00 here\n")
    (tmp_path / "latin1.txt").write_bytes(head + "na\u00efve\n".encode("latin-1"))
    (tmp_path / "cut.txt").write_bytes(head + "\u4e2d".encode()[:2])  # a character cut off at the end
    p = str(tmp_path)
    assert corpus_error([f"{p}/nul.txt"]) == (f"data.paths: {p}/nul.txt:4: NUL byte at byte 20: binary content, not "
                                              "text; remove the file from the corpus")
    assert corpus_error([f"{p}/latin1.txt"]) == (
        f"data.paths: {p}/latin1.txt:3: invalid UTF-8 (byte 0xef) at byte 15: not UTF-8 text; re-encode the file "
        "as UTF-8 (e.g. iconv -t utf-8) or remove it from the corpus")
    assert corpus_error([f"{p}/cut.txt"]).startswith(f"data.paths: {p}/cut.txt:3: invalid UTF-8 (byte 0xe4) at byte 13")


def test_elf_binary_renamed_txt_is_an_error_not_a_silent_run(tok, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("fine text\n")
    (tmp_path / "corpus" / "ls.txt").write_bytes(ELF_HEAD + b"\n" + bytes(range(256)) * 4)
    p = tmp_path / "corpus" / "ls.txt"
    assert corpus_error([str(tmp_path / "corpus")]) == (
        f"data.paths: {p}:1: NUL byte at byte 7, the file starts like an ELF executable: binary content, not text; "
        "remove the file from the corpus")
    # Without check_corpus, the loader stops at its first read of the file instead of training on the bytes.
    loader = loader_for([str(p)], tok, tmp_path)
    with pytest.raises(ValueError, match=rf"{p}:1: NUL byte at byte 7, the file starts like an ELF executable"):
        next(loader)


def test_jsonl_lines_are_checked_one_by_one(tmp_path):
    good = json.dumps({"text": "a"})
    cases = {
        "utf8.jsonl": (f"{good}\n".encode() + b'{"text": "caf\xe9"}\n',
                       ":2: invalid UTF-8 (byte 0xe9) at byte 27: not UTF-8 text; re-encode"),
        "field.jsonl": (f"{good}\n\n{json.dumps({'id': 3, 'body': 'x'})}\n".encode(),
                        ":3: no field 'text' (fields found: id, body); set data.text_field to the field holding the "
                        "text"),
        "array.jsonl": (f"{good}\n[1, 2]\n".encode(),
                        ":2: a JSON array, not an object; each document must be an object with a 'text' field"),
        "string.jsonl": (b'"just a string"\n', ":1: a JSON string, not an object;"),
        "number.jsonl": (f'{good}\n{{"text": 7}}\n'.encode(), ":2: field 'text' holds a JSON number, not text"),
        "torn.jsonl": (f'{good}\n{{"text": "a\n'.encode(),
                       ":2: not JSON (Unterminated string starting at, column 10); each line must be one JSON object"),
        "blank.jsonl": (b"\n  \n", ": no documents (the file is empty)"),
        "elem.json": (json.dumps([{"text": "a"}, {"body": "b"}]).encode(),
                      ": array element 1: no field 'text' (fields found: body)"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        message = corpus_error([str(tmp_path / name)])
        assert message.startswith(f"data.paths: {tmp_path / name}{expected}"), message
        # Each rank's open_corpus reads the file through datasets, whose failure is explained the same way; Arrow
        # keeps invalid UTF-8, so that one surfaces (named alike) when its document is read.
        with pytest.raises(ValueError) as info:
            open_corpus([str(tmp_path / name)], cache_dir=str(tmp_path / "cache")).texts([0, 1])
        assert str(info.value) == (message if name != "utf8.jsonl" else message[len("data.paths: "):])


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "a.txt").write_text("")
    (tmp_path / "empties" / "b.jsonl").write_text("")
    assert corpus_error([str(tmp_path / "empty_dir")]) == (
        f"data.paths: {tmp_path / 'empty_dir'}: folder holds no data files (.jsonl, .json, .parquet, .txt, .md) or "
        "saved datasets")
    assert corpus_error([str(tmp_path / "empties")]) == (
        f"data.paths: {tmp_path / 'empties' / 'a.txt'}: no documents (the file is empty)")
    assert corpus_error([]) == "data.paths: paths is empty; give at least one data file or folder"
    missing = tmp_path / "nope.txt"
    assert corpus_error([str(missing)]) == f"data.paths: {missing}: data path does not exist"


def test_parquet_and_saved_dataset_checked_by_schema(tmp_path):
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "a.parquet")
    assert corpus_error([str(tmp_path / "a.parquet")]) == (
        f"data.paths: {tmp_path / 'a.parquet'}: no field 'text' (fields found: body, n); set text_field to the one "
        "holding the text")
    assert check_corpus([str(tmp_path / "a.parquet")], "body") is None
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "saved"))
    assert corpus_error([str(tmp_path / "saved")]) == (
        f"data.paths: {tmp_path / 'saved'}: field 'text' holds int64, not text")


def test_argument_and_rank_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", doc_texts(3))
    with pytest.raises(ValueError, match=r"seq_len \(0\) must be >= 1; micro_batch_size \(0\) must be >= 1"):
        loader_for([path], tok, tmp_path, seq_len=0, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_world\) = \[0, 2\)"):
        loader_for([path], tok, tmp_path, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match=r"the corpus has 3 documents, fewer than dp_world \(4\)"):
        loader_for([path], tok, tmp_path, dp_rank=0, dp_world=4)


def test_state_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", doc_texts(6))
    state = loader_for([path], tok, tmp_path, seed=1).state_dict()
    other = loader_for([path], tok, tmp_path, seed=2, dp_world=2)
    with pytest.raises(ValueError, match=r"saved vs now: seed 1 != 2; dp_world 1 != 2"):
        other.load_state_dict(state)
    same = loader_for([path], tok, tmp_path, seed=1)
    with pytest.raises(ValueError, match=r"state lacks doc_index, num_docs"):
        same.load_state_dict({k: v for k, v in state.items() if k not in ("doc_index", "num_docs")})
    with pytest.raises(ValueError, match=r"format 2, this version reads 1"):
        same.load_state_dict({**state, "format": 2})
    with pytest.raises(ValueError, match=r"doc_index=6 is outside this rank's 6 documents per epoch"):
        same.load_state_dict({**state, "doc_index": 6})
    with pytest.raises(ValueError, match=r"token_offset=100000 is outside document \d+ \(\d+ tokens with eos\)"):
        same.load_state_dict({**state, "token_offset": 100000, "doc_index": 2})
    assert same.state_dict() == state  # failed loads change nothing


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nodir: tokenizer directory does not exist"):
        load_tokenizer(str(tmp_path / "nodir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: cannot load a tokenizer \("):
        load_tokenizer(str(tmp_path / "empty"))
    no_eos = tmp_path / "no_eos"
    shutil.copytree(DEMO_TOKENIZER_DIR, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no_eos: tokenizer has no eos token; set eos_token"):
        load_tokenizer(str(no_eos))
