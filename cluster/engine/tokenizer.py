"""Tokenizer (HF `tokenizers`) built from a GGUF vocabulary or a tokenizer.json; chat template via jinja2.

GGUF byte-level BPE (`tokenizer.ggml.model == "gpt2"`): the stored tokens are already in
the GPT-2 byte alphabet; control tokens (type 3) become special tokens matched whole.
The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` where it differs from GPT-2's.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Iterable, Optional

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL = 3
LONG_TEXT_CHARS = 4096


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_token_id: Optional[int], eos_token_ids: Iterable[int],
                 chat_template: Optional[str] = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self._template = None
        self._max_token_chars: Optional[int] = None
        self._piece_texts: Optional[list] = None

    # construction
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """`fields`: the GGUF `tokenizer.ggml.*` / `tokenizer.chat_template` metadata as plain values."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer {kind!r} not supported (only byte-level BPE 'gpt2')")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         fuse_unk=False))
        split = _SPLITS.get(fields.get("tokenizer.ggml.pre", ""))
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif fields.get("tokenizer.ggml.pre") == "smollm":   # SmolLM's tokenizer.json: digits one by one
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type") or []
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])
        eos = [fields["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in fields else []
        return cls(backend, fields.get("tokenizer.ggml.bos_token_id"), eos, fields.get("tokenizer.chat_template"))

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """An HF directory: tokenizer.json (+ tokenizer_config.json for the chat template and specials)."""
        backend = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        tc = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = tc.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja) as f:
                template = f.read()
        if isinstance(template, list):   # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def tok_id(entry) -> Optional[int]:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return backend.token_to_id(text) if text else None
        eos = set(eos_token_ids)
        if not eos and tok_id(tc.get("eos_token")) is not None:
            eos.add(tok_id(tc.get("eos_token")))
        return cls(backend, tok_id(tc.get("bos_token")), eos, template)

    def to_state(self) -> dict:
        """Everything needed to rebuild it without the GGUF (cached next to the weights)."""
        return {"tokenizer_json": self.backend.to_str(), "bos_token_id": self.bos_token_id,
                "eos_token_ids": sorted(self.eos_token_ids), "chat_template": self.chat_template}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(HFTokenizer.from_str(state["tokenizer_json"]), state["bos_token_id"],
                   state["eos_token_ids"], state["chat_template"])

    # use
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) < LONG_TEXT_CHARS:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:   # NOTE: encode_batch releases the GIL (encode does not): a long prompt must not stall other threads
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (no special tokens), all at once: the backend runs them in
        parallel without holding the GIL."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def max_token_chars(self) -> int:
        """No token decodes to more characters than its longest vocabulary entry has
        (byte-level and sentencepiece pieces carry one character per byte or more), so a
        text of N characters needs at least N / max_token_chars tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self.backend.get_vocab(with_added_tokens=True)))
        return self._max_token_chars

    @property
    def piece_texts(self) -> list[Optional[str]]:
        """Per token id, the characters it adds wherever it stands, or None where that depends
        on its neighbours. With a byte-level decoder, a token whose bytes are whole UTF-8
        characters decodes alike alone and in any sequence; added (special) tokens and
        partial characters are None. Any other decoder: all None (built once, on first use)."""
        if self._piece_texts is None:
            n = self.vocab_size
            pieces: list[Optional[str]] = [None] * n
            if isinstance(self.backend.decoder, decoders.ByteLevel):
                added = self.backend.get_added_tokens_decoder()
                texts = self.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
                pieces = [None if i in added or "\ufffd" in t else t for i, t in enumerate(texts)]
            self._piece_texts = pieces
        return self._piece_texts

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            # same environment options as transformers, so the rendered text matches it
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        special = {"bos_token": self._text(self.bos_token_id),
                   "eos_token": self._text(min(self.eos_token_ids) if self.eos_token_ids else None)}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special, **kwargs)

    def _text(self, token_id: Optional[int]) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


class IncrementalDetokenizer:
    """Streams text for a growing id list; never emits half a UTF-8 character.

    Decodes a short window (`prefix_offset:`) rather than everything, and holds new text
    back while it ends with U+FFFD (an incomplete multi-byte character). It keeps the ids, not
    the text: the caller has every delta it returned.
    """

    __slots__ = ("tokenizer", "skip_special_tokens", "pieces", "ids", "prefix_offset", "read_offset")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pieces = tokenizer.piece_texts
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add_one(self, token_id: int) -> str:
        """`add([token_id])`; the common case (a context-free piece, nothing held back) first."""
        if self.read_offset == len(self.ids) and 0 <= token_id < len(self.pieces):
            piece = self.pieces[token_id]
            if piece is not None:
                self.ids.append(token_id)
                self.prefix_offset = self.read_offset
                self.read_offset += 1
                return piece
        return self.add((token_id,))

    def add(self, token_ids: Iterable[int]) -> str:
        start = len(self.ids)
        self.ids.extend(token_ids)
        if self.read_offset == start:          # nothing held back: context-free pieces just join
            try:
                delta = "".join([self.pieces[t] for t in self.ids[start:]])
            except (TypeError, IndexError):    # a piece that needs its context: decode the window
                return self._advance(final=False)
            self.prefix_offset, self.read_offset = start, len(self.ids)
            return delta
        return self._advance(final=False)

    def finish(self) -> str:
        """The text still held back when the sequence ends: a trailing incomplete character is
        sent as U+FFFD (as transformers decodes it) rather than dropped."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


def _raise(message: str):
    import jinja2   # the template's own refusal: TemplateError, as transformers raises it
    raise jinja2.TemplateError(message)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
