"""Rebuild a Hugging Face `tokenizers` tokenizer from GGUF metadata.

GGUF files carry the vocabulary but not `tokenizer.json`. mlx-lm (through
transformers) needs the JSON files, and transformers' own GGUF reader needs
torch, so we build the tokenizer here to behave like llama.cpp's:

* `gpt2` vocabularies are byte-level BPE with the merges from the file and a
  pre-tokenizer chosen by `tokenizer.ggml.pre`;
* `llama` vocabularies are SentencePiece-style BPE: llama.cpp merges the
  adjacent pair whose joined piece has the best score, which is a BPE whose
  merge ranks follow the scores of the joined pieces, with byte fallback.

Control tokens become special added tokens and user-defined tokens plain
added tokens: llama.cpp also splits both out of the text before merging.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn; llama.cpp treats them as end-of-generation too.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")

# Used when a Gemma GGUF carries no template: Gemma's turn format, with the
# system prompt folded into the first user turn as Gemma has no system role.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (system if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_DEFAULT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}


def _byte_level_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre == "smollm":  # digits one by one, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported yet")


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two known pieces, best joined score first."""
    known = set(tokens)
    normal = sorted((i for i, t in enumerate(types) if t == NORMAL), key=lambda i: -scores[i])
    merges = []
    for i in normal:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this GGUF vocabulary."""
    kind = meta["tokenizer.ggml.model"]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", kind == "llama"))

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        merges = _spm_merges(tokens, list(meta["tokenizer.ggml.scores"]), types)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(
            models.BPE(
                vocab,
                merges,
                unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        steps = [normalizers.Prepend("▁")] if add_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported yet")

    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)]
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def eos_token_ids(meta: dict) -> list[int]:
    """The file's eos/eot ids plus any control token that ends a turn."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids += [i for i, t in enumerate(types) if t == CONTROL and tokens[i] in END_OF_TURN_TEXTS]
    return list(dict.fromkeys(i for i in ids if i is not None))


def write_tokenizer(meta: dict, out_dir: Path) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Returns the token-id entries for config.json (bos/eos/pad ids).
    """
    out_dir = Path(out_dir)
    tokens = meta["tokenizer.ggml.tokens"]
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))

    def text(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[i] if i is not None else None), i

    (bos, bos_id), (eos, eos_id), (unk, _), (pad, pad_id) = (
        text(k) for k in ("bos", "eos", "unknown", "padding")
    )
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    arch = meta["general.architecture"]
    template = meta.get("tokenizer.chat_template") or _DEFAULT_TEMPLATES.get(arch)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{arch}.context_length", 2048),
    }
    if template:
        tok_config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))

    eos_ids = eos_token_ids(meta)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    if pad_id is not None:
        ids["pad_token_id"] = pad_id
    return {k: v for k, v in ids.items() if v is not None}
