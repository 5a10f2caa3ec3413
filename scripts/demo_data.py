"""The demo model's data: a deterministic slice of the Python standard library's sources,
its held-out split, the byte-level BPE tokenizer and the tokenizer files of the export."""

import json
import os

import numpy as np

EXCLUDE_DIRS = {
    "test",
    "tests",
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "tkinter",
    "venv",
    "config-3",
}
SPECIAL_TOKENS = ["<s>", "<|endoftext|>", "</s>", "<|im_start|>", "<|im_end|>"]


def collect_corpus(max_bytes: int, max_file_bytes: int = 150_000):
    """Deterministic sorted subset of the stdlib's own *.py sources."""
    root = os.path.dirname(os.__file__)
    files = []
    for d, dirs, fs in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDE_DIRS and not x.startswith("config-"))
        for f in sorted(fs):
            if f.endswith(".py") and not f.startswith("test_"):
                files.append(os.path.join(d, f))
    files.sort(key=lambda p: os.path.relpath(p, root))
    docs, total = [], 0
    for p in files:
        try:
            with open(p, "r", encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text.encode()) > max_file_bytes:
            continue
        docs.append((os.path.relpath(p, root), text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return root, docs


def split_docs(docs, every: int = 50):
    """Hold out every `every`-th file (2% for every=50) for evaluation."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, held


def train_tokenizer(train_docs, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t for _, t in train_docs], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def encode_stream(tok, docs):
    """<s> doc <|endoftext|> <s> doc <|endoftext|> ... as one int32 stream."""
    encs = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
    out = []
    for e in encs:
        out.append(0)
        out.extend(e.ids)
        out.append(1)
    return np.asarray(out, dtype=np.int64)


def write_tokenizer_files(tok, out_dir, eos_ids, max_len):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # A base model trained on plain code; it still gets Step-3.5's chat template, so that the
    # chat path (server, generate.py without --ignore-chat-template) runs end to end on it.
    template_path = os.path.join(os.path.dirname(__file__), "..", "mlx_step35", "chat_template.jinja")
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": open(template_path, encoding="utf-8").read(),
    }
    json.dump(tcfg, open(os.path.join(out_dir, "tokenizer_config.json"), "w"), indent=2)
    stm = {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>"],
    }
    json.dump(stm, open(os.path.join(out_dir, "special_tokens_map.json"), "w"), indent=2)
    gen = {
        "bos_token_id": 0,
        "eos_token_id": eos_ids,
        "pad_token_id": 1,
        "do_sample": False,
        "transformers_version": "5.0.0",
    }
    json.dump(gen, open(os.path.join(out_dir, "generation_config.json"), "w"), indent=2)
