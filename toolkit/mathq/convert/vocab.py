"""``tokenizer.json`` -> llama.cpp's ``tokenizer.ggml.*`` metadata, as upstream writes it.

llama.cpp reimplements each BPE pre-tokenizer in C++ and picks one by the name in
``tokenizer.ggml.pre``; the regexes in ``tokenizer.json`` are not used. A wrong name
therefore loads fine and tokenizes math text subtly wrong, so the name is never guessed:
it comes from the recipe, from ``--pre-tokenizer``, or from recognising the exact
``pre_tokenizer`` section of ``tokenizer.json`` in :data:`PRE_TOKENIZERS`; otherwise the
conversion is refused. Verification afterwards tokenizes check texts both ways.

Token list and types follow llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base``):
ids missing from the tokenizer up to the model's ``vocab_size`` become ``[PAD{id}]``
(UNUSED); special added tokens, and added tokens that look special, are CONTROL; other
added tokens USER_DEFINED. Upstream reads the vocabulary through transformers'
``AutoTokenizer`` (4.x, as llama.cpp's requirements pin it), which adds the special tokens
``tokenizer_config.json`` names, or its tokenizer class defaults, that ``tokenizer.json``
lacks: a ``LlamaTokenizerFast`` config without an ``unk_token`` key gains ``<unk>`` at the
next free id (DeepSeek's 100015), a CONTROL token. :func:`transformers_special_tokens`
reproduces that, so both converters write the same token list; a config that says
``"unk_token": null`` (DeepSeek's own) adds nothing, and ``[PAD100015]`` stays. Merges,
special-token ids, add_bos/add_eos and the chat template are read by gguf-py's own
``SpecialVocab``, the code upstream uses for them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from mathq.convert.hfconfig import read_checkpoint_json
from mathq.errors import CheckpointError, shorten
from mathq.inputs import file_problem

# llama.cpp pre-tokenizer name -> SHA-256 of the canonical JSON of the ``pre_tokenizer``
# section (see :func:`pre_tokenizer_signature`) of a tokenizer.json known to need it.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # deepseek-ai/deepseek-llm-7b-base, shared by DeepSeek-Math 7B base/instruct/rl
    # (the fixture tests/fixtures/deepseek-llm-tokenizer/tokenizer.json).
    "deepseek-llm": ("56ef5b6116743b9ae5073789acdbb9c962c7dfbac99529228efe28b04faa874e",),
}

TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE


@dataclass(frozen=True)
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` holds except what SpecialVocab writes itself."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str
    pre_source: str
    n_real: int
    special: gguf.SpecialVocab
    add_space_prefix: bool | None


def pre_tokenizer_signature(tokenizer: dict[str, Any]) -> str:
    """SHA-256 of the ``pre_tokenizer`` section, key order and whitespace normalised.

    Non-ASCII characters are escaped, so a copy whose regexes went through Unicode
    normalisation (which silently changes DeepSeek's letter class) gets another signature.
    """
    section = json.dumps(
        tokenizer.get("pre_tokenizer"), sort_keys=True, ensure_ascii=True, separators=(",", ":")
    )
    return hashlib.sha256(section.encode("ascii")).hexdigest()


def recognise_pre_tokenizer(tokenizer: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name for this tokenizer.json, or None if unknown."""
    signature = pre_tokenizer_signature(tokenizer)
    return next((name for name, sigs in PRE_TOKENIZERS.items() if signature in sigs), None)


def load_tokenizer_json(hf_dir: Path) -> dict[str, Any]:
    """Read and sanity-check ``tokenizer.json`` (a byte-level BPE tokenizer)."""
    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        other = (
            "tokenizer.model (SentencePiece) only"
            if (Path(hf_dir) / "tokenizer.model").is_file()
            else "no tokenizer"
        )
        raise CheckpointError(
            f"no tokenizer.json in {hf_dir} ({other})",
            "download the model's tokenizer.json and tokenizer_config.json",
        )
    data = read_checkpoint_json(path, "download it again")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: no model.vocab table", "download it again")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE" if model.get("byte_fallback") else model.get("type")
        raise CheckpointError(
            f"{path}: {kind} tokenizers are not supported",
            "mathq converts byte-level BPE tokenizers (tokenizer.ggml.model "
            "gpt2); use llama.cpp's convert_hf_to_gguf.py",
        )
    return data


def load_hf_tokenizer(path: Path) -> Any:
    """``tokenizers.Tokenizer`` of ``path``; its load errors become one CheckpointError."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad regexes and JSON
        raise CheckpointError(
            f"{path}: Hugging Face tokenizers cannot load it: {e}",
            "download the tokenizer again; never edit its regexes by hand",
        ) from e


def _looks_special(token: str) -> bool:
    """Upstream's heuristic for added tokens that should be CONTROL though not 'special'."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


#: Special-token attributes in the order transformers adds missing ones
#: (``SPECIAL_TOKENS_ATTRIBUTES``), and the defaults of the tokenizer classes mathq meets.
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "LlamaTokenizerFast": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "CodeLlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "CodeLlamaTokenizerFast": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                      "unk_token": "<|endoftext|>"},
    "GPT2TokenizerFast": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                          "unk_token": "<|endoftext|>"},
}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken
    object with ``content``; None when unset."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def transformers_special_tokens(tok_config: dict[str, Any]) -> list[str]:
    """The special tokens transformers 4.x gives a tokenizer loaded with this config: each
    attribute's value (a key set to null means none), else the class's default, then the
    ``additional_special_tokens``; in the order transformers adds them."""
    defaults = CLASS_DEFAULTS.get(str(tok_config.get("tokenizer_class")), {})
    out: list[str] = []
    for attr in SPECIAL_ATTRIBUTES:
        value = tok_config[attr] if attr in tok_config else defaults.get(attr)
        if (content := _token_content(value)) is not None and content not in out:
            out.append(content)
    for value in tok_config.get("additional_special_tokens") or []:
        if (content := _token_content(value)) is not None and content not in out:
            out.append(content)
    return out


def _add_missing_specials(tok_config: dict[str, Any], vocab: dict[str, int],
                          added: dict[int, dict[str, Any]], id_to_token: dict[int, str],
                          n_vocab: int) -> None:
    """Give the special tokens transformers would add their ids, as it does: a token the
    BPE vocabulary has keeps its id (and becomes special); a new one takes the next id after
    the added tokens (tokenizers' rule), while that id is inside the embedding matrix."""
    added_by_content = {a["content"]: i for i, a in added.items()}
    for content in transformers_special_tokens(tok_config):
        if content in added_by_content:
            continue
        if content in vocab:
            new_id = vocab[content]
        else:
            top = max(added, default=-1)
            new_id = top + 1 if top >= len(vocab) else len(vocab)
            if new_id >= n_vocab:
                continue  # upstream's assertion would stop here; there is no row for it
        added[new_id] = {"content": content, "special": True, "normalized": True}
        added_by_content[content] = new_id
        id_to_token[new_id] = content


def build_vocab(
    hf_dir: Path, n_vocab: int, pre_tokenizer: str | None, pre_source: str = "option"
) -> GGUFVocab:
    """Token list, types and special vocab for a model with ``n_vocab`` embedding rows.

    ``pre_tokenizer`` (from a recipe or ``--pre-tokenizer``) wins; without it the
    ``pre_tokenizer`` section must be one :data:`PRE_TOKENIZERS` knows.
    """
    hf_dir = Path(hf_dir)
    data = load_tokenizer_json(hf_dir)
    if pre_tokenizer is None:
        pre_tokenizer, pre_source = recognise_pre_tokenizer(data), "tokenizer.json"
        if pre_tokenizer is None:
            raise CheckpointError(
                f"{hf_dir / 'tokenizer.json'}: unknown pre-tokenizer (signature "
                f"{pre_tokenizer_signature(data)[:16]})",
                "name llama.cpp's pre-tokenizer for it with --pre-tokenizer, e.g. "
                "--pre-tokenizer deepseek-llm; verification will check the choice",
            )

    id_to_token: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in data.get("added_tokens") or []}
    for i, a in added.items():
        id_to_token[i] = a["content"]
    if id_to_token and max(id_to_token) >= n_vocab:
        raise CheckpointError(
            f"tokenizer.json has token id {max(id_to_token)} but config.json's vocab_size is "
            f"{n_vocab}",
            "config.json and the tokenizer do not belong together",
        )

    config_path = hf_dir / "tokenizer_config.json"
    tok_config: dict[str, Any] = {}
    problem = file_problem(config_path)
    if problem not in (None, "does not exist"):  # optional, but not as a pipe or a folder
        raise CheckpointError(f"{config_path} {problem}", "download it again")
    if problem is None:
        loaded = read_checkpoint_json(config_path, "download it again")
        tok_config = loaded if isinstance(loaded, dict) else {}
    _add_missing_specials(tok_config, data["model"]["vocab"], added, id_to_token, n_vocab)

    tokenizer = load_hf_tokenizer(hf_dir / "tokenizer.json")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        entry = added.get(i)
        if entry is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            if not entry.get("normalized", True):
                # llama.cpp expects control and user-defined tokens pre-normalised.
                ids = tokenizer.encode(token, add_special_tokens=False).ids
                token = tokenizer.decode(ids, skip_special_tokens=False)
            if entry.get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        tokens.append(token)

    add_space_prefix = None
    if isinstance(tok_config.get("add_prefix_space"), bool):
        add_space_prefix = tok_config["add_prefix_space"]
    try:
        special = gguf.SpecialVocab(hf_dir, load_merges=True)
    except ValueError as e:  # gguf refuses a negative special token id
        raise CheckpointError(f"{hf_dir}: {e}", "fix the token ids in config.json and "
                              "tokenizer_config.json") from None
    for kind, token_id in special.special_token_ids.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) \
                or not 0 <= token_id < n_vocab:
            raise CheckpointError(
                f"{hf_dir}: the {kind} token id {shorten(repr(token_id), 40)} is not a token "
                f"of the vocabulary (0 to {n_vocab - 1})",
                "fix the token ids in config.json and tokenizer_config.json")
    if not special.merges:
        raise CheckpointError(
            f"{hf_dir / 'tokenizer.json'}: no BPE merges", "download the tokenizer again"
        )
    return GGUFVocab(
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in types),
        pre=pre_tokenizer,
        pre_source=pre_source,
        n_real=len(id_to_token),
        special=special,
        add_space_prefix=add_space_prefix,
    )


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Write ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` in upstream's order."""
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    vocab.special.add_to_gguf(writer, quiet=True)
