"""Byte-level BPE tokenizer with DeepSeek's special tokens (docs/architecture.md §7), on the `tokenizers` library.

Pre-tokenizer (our choice, documented): DeepSeek-V3's own `tokenizer.json` pre-tokenizer, i.e. three
isolating regex ``Split``s followed by a ``ByteLevel`` step that only maps bytes (``use_regex=False``):

1. ``\\p{N}{1,3}``           numbers in groups of at most three digits;
2. ``[一-龥\\u3040-ゟ゠-ヿ]+``  runs of CJK ideographs / kana;
3. a GPT-style word regex in which punctuation/symbol runs are their own pieces (``" ?[\\p{P}\\p{S}]+[\\r\\n]*"``),
   line breaks are split off (``"\\s*[\\r\\n]+"``), and a punctuation character may lead a letter run
   (``".foo"``, ``"_bar"``), which suits code.

The pipeline is lossless: ``decode(encode(x)) == x`` for every string (no normalizer, no prefix space).

Special tokens keep DeepSeek's spelling (fullwidth ``｜`` U+FF5C and ``▁`` U+2581) and, in a tokenizer
trained here, DeepSeek-V3's relative order: BOS 0, EOS 1, PAD 2, then ``fim▁hole``, ``fim▁begin``,
``fim▁end``, then the chat turns ``<｜User｜>`` 6 and ``<｜Assistant｜>`` 7 (``render_chat`` / ``Tokenizer.encode_chat``:
DeepSeek-V3's chat template). ``Tokenizer.encode`` treats special-token *text* inside documents as plain text (a code file
that mentions ``<｜end▁of▁sentence｜>`` does not inject an EOS); pass ``allow_special=True`` to parse it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from ..errors import DataError, DataNotFoundError

TOKENIZER_FILE = "tokenizer.json"

# DeepSeek-V3 tokenizer.json, pre_tokenizer.pretokenizers[0..2] (all with behavior "Isolated").
PRETOKENIZE_PATTERNS = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special-token strings the data pipeline needs, by role."""
    bos: str = "<｜begin▁of▁sentence｜>"
    eos: str = "<｜end▁of▁sentence｜>"
    pad: str = "<｜▁pad▁｜>"
    fim_hole: str = "<｜fim▁hole｜>"
    fim_begin: str = "<｜fim▁begin｜>"
    fim_end: str = "<｜fim▁end｜>"
    user: str = "<｜User｜>"              # chat turns (docs/design.md §Post-training); reserved so that
    assistant: str = "<｜Assistant｜>"    # a tokenizer trained here can be fine-tuned on conversations

    def items(self) -> list[tuple[str, str]]:
        """``[(role, token string)]`` in id order for a freshly trained tokenizer."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


DEEPSEEK_SPECIAL_TOKENS = SpecialTokens()
REQUIRED_ROLES = ("bos", "eos", "fim_begin", "fim_hole", "fim_end")  # pad falls back to eos
CHAT_ROLES = ("bos", "eos", "user", "assistant")  # what `render_chat` / `encode_chat` need


def deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in PRETOKENIZE_PATTERNS]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of DeepSeek's special tokens by name.

    ``bos_id, eos_id, pad_id, fim_begin_id, fim_hole_id, fim_end_id``; ``special_ids`` maps role → id;
    ``vocab_size`` counts added tokens (the smallest model vocab that can embed every id).
    ``require``: the roles that must exist (the data pipeline's, by default); a role outside it that the
    vocabulary lacks has id ``None`` (inference loads any ``tokenizer.json`` with ``require=()``).
    """

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS,
                 source: str = "<memory>", require: Sequence[str] = REQUIRED_ROLES):
        self.backend = backend
        self.special = special
        ids, missing = {}, []
        for role, token in special.items():
            tid = backend.token_to_id(token)
            if tid is None and role == "pad":
                tid = backend.token_to_id(special.eos)   # no pad token: pad with EOS (always loss-masked)
            if tid is None and role in require:
                missing.append(f"{role} {token!r}")
            ids[role] = tid
        if missing:
            raise DataError(f"tokenizer {source} lacks the special token(s) {', '.join(missing)}; the data "
                             "pipeline needs BOS, EOS and the three FIM tokens (DeepSeek spelling: fullwidth "
                             "'｜' U+FF5C and '▁' U+2581). Train one with `dsv3 tokenizer train` or add them.")
        self.special_ids: dict[str, int] = ids
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids["fim_begin"], ids["fim_hole"], ids["fim_end"]
        self.user_id, self.assistant_id = ids["user"], ids["assistant"]   # None: no chat tokens
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Two views of one vocabulary: `_plain` encodes special-token text as ordinary text.
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True

    def encode(self, text: str, *, allow_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added. ``allow_special``: parse special-token text into ids.
        ``add_special_tokens``: apply the file's post-processor (DeepSeek's prepends BOS), as
        ``transformers``' ``tokenizer(text)`` does — how ``score --text`` and ``generate --prompt`` encode."""
        tok = self.backend if allow_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """DeepSeek-V3's chat template as ids, with a per-token mask: 1 on the tokens an assistant turn
        produces (its text and the closing EOS), 0 on BOS, system prompt, user turns and the
        ``<｜Assistant｜>`` markers — the tokens SFT learns (docs/design.md §Post-training). Equals
        ``encode(render_chat(...), allow_special=True)``: special tokens split a text before BPE runs,
        so encoding turn by turn gives the same ids. ``add_generation_prompt``: end with
        ``<｜Assistant｜>`` (the prompt a generator continues)."""
        missing = [r for r in CHAT_ROLES if self.special_ids.get(r) is None]
        if missing:
            raise DataError(f"this tokenizer lacks the chat token(s) {', '.join(getattr(self.special, r) for r in missing)}"
                            " (fix: train it with `dsv3 tokenizer train`, which reserves them, or use the "
                            "model's own tokenizer.json).")
        system, turns = _split_chat(messages)
        ids = [self.bos_id] + (self.encode(system) if system else [])
        mask = [0] * len(ids)
        for role, text in turns:
            body = self.encode(text)
            if role == "user":
                ids += [self.user_id] + body
                mask += [0] * (1 + len(body))
            else:
                ids += [self.assistant_id] + body + [self.eos_id]
                mask += [0] + [1] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` is a directory, or a file name ending in ``.json``)."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / TOKENIZER_FILE
        if target.parent.exists() and not target.parent.is_dir():
            raise DataError(f"cannot write {target}: {target.parent} is a file, not a directory (fix: save into "
                            "a directory).")
        tmp = target.with_name(target.name + ".tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.backend.save(str(tmp))
            os.replace(tmp, target)   # a failed write never leaves a complete-looking tokenizer.json
        except Exception as e:        # OSError, or the bare Exception `tokenizers` raises on a failed write
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write {target}: {getattr(e, 'strerror', None) or e} (fix: free disk space, "
                            "or choose another directory).") from None
        return target

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_ids={self.special_ids})"


def _split_chat(messages: Sequence[dict]) -> tuple[str, list[tuple[str, str]]]:
    """``(system prompt, [(role, text)])`` of a conversation; ``DataError`` naming a malformed message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"a conversation must be a list of {{'role', 'content'}} messages, got "
                        f"{type(messages).__name__} (fix: e.g. [{{'role': 'user', 'content': '1+1='}}]).")
    system, turns = [], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        text = m.get("content") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(text, str):
            raise DataError(f"message {i} of a conversation is {str(m)[:80]!r}; each message needs a role of "
                            "'system', 'user' or 'assistant' and a string 'content' (fix: e.g. "
                            "{'role': 'user', 'content': '1+1='}).")
        if role == "system":
            if turns:
                raise DataError(f"message {i} is a system prompt after the conversation started (fix: put system "
                                "messages first).")
            system.append(text)
        else:
            turns.append((role, text))
    return "\n\n".join(system), turns


def render_chat(messages: Sequence[dict], special: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS, *,
                add_generation_prompt: bool = False) -> str:
    """DeepSeek-V3's chat template as text: ``<｜begin▁of▁sentence｜>{system}<｜User｜>{u}<｜Assistant｜>{a}
    <｜end▁of▁sentence｜>…`` (system messages joined by a blank line, right after BOS; every assistant
    turn closed by EOS); ``add_generation_prompt`` appends ``<｜Assistant｜>``. ``messages``: a list of
    ``{"role": "system"|"user"|"assistant", "content": str}``."""
    system, turns = _split_chat(messages)
    out = [special.bos, system]
    for role, text in turns:
        out += [special.user, text] if role == "user" else [special.assistant, text, special.eos]
    if add_generation_prompt:
        out.append(special.assistant)
    return "".join(out)


def train_tokenizer(documents: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2,
                    special: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS, length: Optional[int] = None,
                    show_progress: bool = False, source: str = "the training documents") -> Tokenizer:
    """Train a byte-level BPE on ``documents`` with DeepSeek's pre-tokenizer and special tokens.

    ``vocab_size`` counts the 256 byte tokens and the special tokens; a small corpus may stop short of it
    (the result's ``vocab_size`` is the real size). ``length``: number of documents, for progress only.
    Documents that hold no text at all raise ``DataError`` naming ``source``.
    """
    n_special = len(special.items())
    if vocab_size < 256 + n_special:
        raise DataError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
                        f"{n_special} special tokens (at least {256 + n_special}) (fix: e.g. 4096).")
    if min_frequency < 0:
        raise DataError(f"min_frequency={min_frequency!r}: must be an integer >= 0 (fix: e.g. 2).")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = deepseek_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[token for _, token in special.items()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = {"documents": 0, "with_text": 0}

    def counted(docs: Iterable[str]):
        for doc in docs:
            seen["documents"] += 1
            seen["with_text"] += bool(doc.strip())
            yield doc

    tok.train_from_iterator(counted(documents), trainer=trainer, length=length)
    if not seen["with_text"]:
        raise DataError(f"{source}: the {seen['documents']} document(s) hold no text, so there is nothing to train "
                        "a tokenizer on (fix: point the data path at files with text).")
    return Tokenizer(tok, special)


def load_tokenizer(path: str | os.PathLike, special: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS, *,
                   require: Sequence[str] = REQUIRED_ROLES, missing_ok: bool = False,
                   fix: str = "train one with `dsv3 tokenizer train --output DIR`") -> Optional[Tokenizer]:
    """Load a ``tokenizer.json`` (DeepSeek's released one or ours): a file, or a directory holding one
    (a checkpoint, a run directory). The one tokenizer loader: training, data, ``score`` and ``generate``.

    ``require``: special-token roles that must exist (see :class:`Tokenizer`; ``()`` for any tokenizer).
    A missing file raises :class:`~dsv3_jax.errors.DataNotFoundError` ending in ``(fix: <fix>)``, or
    returns ``None`` with ``missing_ok``; an unreadable one raises :class:`~dsv3_jax.errors.DataError`.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        if missing_ok:
            return None
        if path.is_dir():
            raise DataNotFoundError(f"{path} has no {TOKENIZER_FILE} (fix: {fix}).")
        raise DataNotFoundError(f"no tokenizer at {path}: expected a {TOKENIZER_FILE} file or a directory holding "
                                f"one (fix: {fix}).")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{file} is not a valid tokenizers JSON file: {e} (fix: replace it with the model's own "
                        f"{TOKENIZER_FILE}).") from None
    return Tokenizer(backend, special, source=str(file), require=require)
