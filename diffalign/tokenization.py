"""Offline tokenizers.

The CLIP BPE tokenizer is rebuilt from the vocabulary file that open_clip ships, so nothing
is downloaded. It is the real 49,408-token vocabulary that SDXL and SD3 use.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


def _bytes_to_unicode() -> list[str]:
    # The GPT-2/CLIP reversible byte -> printable unicode table, in CLIP's order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def clip_tokenizer_files() -> str:
    """Write `vocab.json` and `merges.txt` for the CLIP tokenizer into a cache folder and return it."""
    import open_clip

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(bpe_path):
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing at {bpe_path}; reinstall open_clip_torch.")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab_list)} tokens, expected {CLIP_VOCAB_SIZE}")

    cache_root = os.environ.get("DIFFALIGN_CACHE", os.path.join(tempfile.gettempdir(), "diffalign-cache"))
    out = os.path.join(cache_root, "clip-tokenizer")
    os.makedirs(out, exist_ok=True)
    vocab_path = os.path.join(out, "vocab.json")
    if not os.path.exists(vocab_path):
        # Write to temporary names first: concurrent processes may build the same folder.
        tmp_vocab, tmp_merges = f"{vocab_path}.{os.getpid()}", os.path.join(out, f"merges.txt.{os.getpid()}")
        with open(tmp_vocab, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab_list)}, f)
        with open(tmp_merges, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("\n".join(" ".join(m) for m in merges) + "\n")
        os.replace(tmp_merges, os.path.join(out, "merges.txt"))
        os.replace(tmp_vocab, vocab_path)
    return out


def clip_tokenizer(model_max_length: int = 77):
    """A transformers `CLIPTokenizer` with the real CLIP vocabulary, built offline.

    `model_max_length` must be set: left at its default (~1e30) the SDXL/SD3 pipelines fail when padding.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_files(), model_max_length=model_max_length)
