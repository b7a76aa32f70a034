"""mathq convert: a tiny DeepSeek-shaped checkpoint through the converter into llama.cpp.

The checkpoint is built here (tests/tinymodel.py): real DeepSeek tokenizer and vocab size,
toy widths, bf16 weights in two shards with an index. What is shown:

- llama.cpp's logits on the converted file equal a NumPy forward pass of the same Hugging
  Face weights (top-1 at every position, a stated relative-error bound), and a file made
  without the q/k permutation would be far outside that bound;
- bf16 tensors are bit-exact (permuted rows included), metadata agrees with llama.cpp's
  own vocab GGUF of this tokenizer;
- llama.cpp tokenizes llama.cpp's test vectors and all of MATH-500 as tokenizers does;
- bad inputs end in one line and leave no file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import unicodedata
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from mathq.cli.convert import OUTTYPE_CHOICES
from mathq.convert.converter import OUTTYPES, ConvertOptions, convert_checkpoint
from mathq.convert.safetensors_reader import copy_range
from mathq.convert.tensor_map import permute_rows
from mathq.convert.verify import LlamaVocab
from mathq.convert.writer import StreamingGGUFWriter
from tests.clirun import run
from tests.conftest import FIXTURES
from tests.tinymodel import (
    TinySpec,
    build_checkpoint,
    forward,
    tensor_values,
    to_bf16_bits,
)

VOCAB_FIXTURE = FIXTURES / "deepseek-llm-tokenizer"
PROMPT = (
    r"Let $x^2 + 3x = 10$. Then \frac{a}{b} = 12345, 你好."
    "\n"
    r"Please reason step by step, and put your final answer within \boxed{}."
)
# Max |llama.cpp - NumPy| over the vocabulary, relative to max |NumPy logit|, per position.
# llama.cpp's CPU matmuls round activations to bf16 for bf16 weights (~0.5% measured), but
# keep them f32 for f32 weights (~0.04% measured).
REL_BOUND = {"bf16": 2e-2, "f32": 2e-3}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The default tiny checkpoint (MHA, two shards) and its verified BF16 GGUF."""
    root = tmp_path_factory.mktemp("tiny")
    spec = TinySpec()
    hf = build_checkpoint(root / "hf", spec)
    result = convert_checkpoint(hf, root / "tiny-BF16.gguf")
    return spec, hf, result


@pytest.fixture(scope="session")
def tiny_reader(tiny):
    return GGUFReader(tiny[2].path)


def llama_logits(path: Path, text: str) -> tuple[list[int], np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, n_batch=128, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return ids, scores


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def assert_logits_match(spec: TinySpec, path: Path, outtype: str) -> None:
    ids, got = llama_logits(path, PROMPT)
    assert ids[0] == 100000 and len(ids) > 30
    ref = forward(spec, ids)
    err = rel_error(got, ref)
    assert err < REL_BOUND[outtype], err
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()
    # Negative control: without the q/k permutation llama.cpp would compute interleaved
    # RoPE on rotate-half weights; that is what this forward pass models.
    assert rel_error(got, forward(spec, ids, rope="interleaved")) > 10 * REL_BOUND[outtype]


def test_bf16_logits_match_numpy_forward(tiny):
    spec, _, result = tiny
    assert result.verification is not None and result.verification.tokens_compared > 300
    assert_logits_match(spec, result.path, "bf16")


def test_gqa_unsharded_f32_logits_match(tmp_path):
    spec = replace(TinySpec(), n_head_kv=2, shards=1, seed=1)
    hf = build_checkpoint(tmp_path / "hf", spec)
    assert (hf / "model.safetensors").is_file()
    events = []
    result = convert_checkpoint(
        hf, tmp_path / "gqa-F32.gguf", ConvertOptions(outtype="f32"), progress=events.append
    )
    assert result.copied_tensors == 0  # every bf16 tensor widened to f32
    written = [e for e in events if e.stage == "convert"]
    assert len(written) == result.n_tensors and written[-1].unit == "B"
    assert written[-1].done == written[-1].total == result.tensor_bytes
    assert written[-1].info == f"{result.n_tensors}/{result.n_tensors} tensors"
    assert_logits_match(spec, result.path, "f32")


def test_bf16_tensors_are_bit_exact(tiny, tiny_reader):
    spec, _, result = tiny
    tensors = {t.name: t for t in tiny_reader.tensors}
    assert len(tensors) == 2 + spec.n_layer * 9 + 1 == result.n_tensors
    assert result.copied_tensors == 2 + spec.n_layer * 5  # embd, output, v, o, gate, up, down
    cases = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "output.weight": ("lm_head.weight", None),
        "blk.1.attn_v.weight": ("model.layers.1.self_attn.v_proj.weight", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", spec.n_head),
        "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj.weight", spec.n_head_kv),
    }
    for gguf_name, (hf_name, n_head) in cases.items():
        t = tensors[gguf_name]
        assert t.tensor_type == GGMLQuantizationType.BF16
        want = to_bf16_bits(tensor_values(spec, hf_name))
        if n_head is not None:
            want = permute_rows(want, n_head)
        assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(want.shape), want)
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == GGMLQuantizationType.F32
    assert np.array_equal(
        np.asarray(norm.data), tensor_values(spec, "model.layers.0.input_layernorm.weight")
    )


def test_f16_outtype_rounds_like_numpy(tiny, tmp_path):
    spec, hf, _ = tiny
    result = convert_checkpoint(
        hf, tmp_path / "tiny-F16.gguf", ConvertOptions(outtype="f16", verify=False)
    )
    assert (result.file_type, result.copied_tensors) == (1, 0)
    tensors = {t.name: t for t in GGUFReader(result.path).tensors}
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == GGMLQuantizationType.F16
    want = permute_rows(
        tensor_values(spec, "model.layers.1.self_attn.q_proj.weight"), spec.n_head
    ).astype(np.float16)
    assert np.array_equal(np.asarray(q.data).reshape(want.shape), want)
    assert tensors["output_norm.weight"].tensor_type == GGMLQuantizationType.F32


def kv(reader: GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        n = len(field.data)
        is_array = field.types[0].name == "ARRAY"
        out[key] = [field.contents(i) for i in range(n)] if is_array else field.contents()
    return out


def test_metadata_agrees_with_llama_cpp_vocab_gguf(tiny, tiny_reader):
    spec, _, _ = tiny
    ours, ref = kv(tiny_reader), kv(GGUFReader(VOCAB_FIXTURE / "ggml-vocab-deepseek-llm.gguf"))
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "llama.vocab_size",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "general.architecture",
    ):
        assert ours[key] == ref[key], key
    types = ours["tokenizer.ggml.token_type"]
    # Real tokens agree; llama.cpp's fixture predates UNUSED for the [PAD] rows.
    assert types[:100015] == ref["tokenizer.ggml.token_type"][:100015]
    assert types[100000] == types[100001] == TokenType.CONTROL
    assert types[100002] == TokenType.USER_DEFINED
    assert set(types[100015:]) == {TokenType.UNUSED}
    assert ours["tokenizer.ggml.tokens"][102399] == "[PAD102399]"
    config = json.loads((VOCAB_FIXTURE / "tokenizer_config.json").read_text())
    assert ours["tokenizer.chat_template"] == config["chat_template"]
    assert ours["general.file_type"] == 32  # MOSTLY_BF16
    assert ours["general.quantization_version"] == 2
    assert (
        ours["llama.block_count"],
        ours["llama.embedding_length"],
        ours["llama.feed_forward_length"],
        ours["llama.attention.head_count"],
        ours["llama.attention.head_count_kv"],
        ours["llama.rope.dimension_count"],
        ours["llama.context_length"],
    ) == (
        spec.n_layer,
        spec.n_embd,
        spec.n_ff,
        spec.n_head,
        spec.n_head_kv,
        spec.head_dim,
        spec.n_ctx,
    )


# SHA-256 of the token list and types llama.cpp's convert_hf_to_gguf.py (get_vocab_base)
# writes for the tiny checkpoint, as JSON [[token, type], ...]: computed with transformers
# 4.57.6, whose AutoTokenizer upstream loads. With DeepSeek's "unk_token": null, id 100015 is
# [PAD100015] (UNUSED); without the key, LlamaTokenizerFast's default "<unk>" is appended
# there as a special token (CONTROL).
UPSTREAM_VOCAB_SHA256 = {
    "unk_token null": "69483ad0293c5b91823851c2e9c9ce2ff3e7192d614090b2c071274663b4ba62",
    "no unk_token key": "fc4eaadde41701783c1a92fe2637ff705f32e54df0f130eeeece855e4fdec36e",
}


@pytest.mark.parametrize("case", list(UPSTREAM_VOCAB_SHA256))
def test_token_list_and_types_equal_upstreams(tiny, tmp_path, case):
    """Every token and type, PAD rows and the 100015 row included, as upstream writes them."""
    import hashlib

    from mathq.convert.vocab import build_vocab

    _, hf, _ = tiny
    folder = clone(hf, tmp_path / "hf", copy=("tokenizer_config.json",))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if case == "no unk_token key":
        del config["unk_token"]
    config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    vocab = build_vocab(folder, 102400, "deepseek-llm")
    listed = [[t, k] for t, k in zip(vocab.tokens, vocab.token_types, strict=True)]
    digest = hashlib.sha256(json.dumps(listed, ensure_ascii=False).encode()).hexdigest()
    assert digest == UPSTREAM_VOCAB_SHA256[case], listed[100015]
    assert listed[100015] == (["[PAD100015]", TokenType.UNUSED] if case == "unk_token null"
                              else ["<unk>", TokenType.CONTROL])


def read_vectors() -> list[tuple[str, list[int]]]:
    inp = (VOCAB_FIXTURE / "ggml-vocab-deepseek-llm.gguf.inp").read_text(encoding="utf-8")
    out = (VOCAB_FIXTURE / "ggml-vocab-deepseek-llm.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    texts[-1] = (
        texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    )
    ids = [[int(t) for t in line.split()] for line in out.split("\n")[: len(texts)]]
    return list(zip(texts, ids, strict=True))


def test_llama_cpp_vectors_and_math500_tokenize_like_tokenizers(tiny):
    from tokenizers import Tokenizer

    _, hf, result = tiny
    vectors = read_vectors()
    assert len(vectors) > 30
    hf_tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    problems = [
        json.loads(line)
        for line in (FIXTURES / "math500" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(problems) == 500
    with LlamaVocab(result.path) as vocab:
        for text, want in vectors:
            assert vocab.tokenize(text) == want, text
        for p in problems:
            for text in (p["problem"], p["solution"]):
                assert vocab.tokenize(text) == hf_tok.encode(text, add_special_tokens=False).ids


def test_outtype_choices_match_the_table():
    assert tuple(OUTTYPES) == OUTTYPE_CHOICES


def test_copy_range_falls_back_to_pread_without_copy_file_range(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    src.write_bytes(b"head" + payload)
    dst.write_bytes(b"")

    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    with open(src, "rb") as a, open(dst, "r+b") as b:
        copy_range(a.fileno(), 4, b.fileno(), 10, len(payload))
    assert dst.read_bytes() == bytes(10) + payload


def test_writer_refuses_out_of_order_tensors(tmp_path):
    w = StreamingGGUFWriter(tmp_path / "x.gguf", "llama")
    w.plan("a.weight", (2, 2), GGMLQuantizationType.F32, 16)
    w.plan("b.weight", (2,), GGMLQuantizationType.F32, 8)
    w.begin()
    with pytest.raises(ValueError, match=r"expected tensor a\.weight, got b\.weight"):
        w.write_array("b.weight", np.zeros(2, np.float32))
    w.write_array("a.weight", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"expected tensor b\.weight before finishing"):
        w.finish()
    w.close()


# ---- the CLI, and inputs that must be refused -------------------------------------------


def clone(src: Path, dest: Path, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder whose files link to ``src`` except those in ``copy``."""
    dest.mkdir()
    for p in src.iterdir():
        if p.name in copy:
            shutil.copyfile(p, dest / p.name)
        else:
            os.symlink(p, dest / p.name)
    return dest


def assert_refused(hf: Path, tmp_path: Path, line: str, *extra: str) -> None:
    out = tmp_path / "out.gguf"
    result = run("convert", str(hf), "--out", str(out), *extra, code=1)
    assert result.output.strip().splitlines() == [line]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


SHARD2 = "model-00002-of-00002.safetensors"
REDOWNLOAD = "(download the checkpoint again (`mathq download` resumes and checks hashes))"
DAMAGED = "(download the file again (e.g. `mathq download`), it is damaged)"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n])


def replace_safetensors_header(path: Path, header: dict) -> None:
    """Write ``header`` over the file's own, padded to the old length: the data section stays
    where it was, so only what the header says is damaged."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])


def test_refuses_unsupported_architecture(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf", copy=("config.json",))
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (hf / "config.json").write_text(json.dumps(config))
    assert_refused(
        hf,
        tmp_path,
        f"Error: unsupported architecture Qwen2ForCausalLM in "
        f"{hf}/config.json (mathq converts LlamaForCausalLM checkpoints; use "
        "llama.cpp's convert_hf_to_gguf.py for others)",
    )


def test_refuses_missing_shard(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf")
    (hf / SHARD2).unlink()
    assert_refused(
        hf, tmp_path, f"Error: shard {SHARD2} is missing from {hf} (2 shards expected) {REDOWNLOAD}"
    )


def test_refuses_truncated_safetensors(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf", copy=(SHARD2,))
    size = (hf / SHARD2).stat().st_size
    os.truncate(hf / SHARD2, size - 1000)
    header_len = struct.unpack("<Q", (hf / SHARD2).read_bytes()[:8])[0]
    data = size - 8 - header_len
    assert_refused(
        hf,
        tmp_path,
        f"Error: {hf / SHARD2}: is truncated: its header describes "
        f"{data} bytes of tensor data, the file holds {data - 1000} {DAMAGED}",
    )


def test_refuses_out_of_bounds_offsets(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf", copy=(SHARD2,))
    header = read_safetensors_header(hf / SHARD2)
    last = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 64, end + 64]
    replace_safetensors_header(hf / SHARD2, header)
    assert_refused(
        hf,
        tmp_path,
        f"Error: {hf / SHARD2}: tensor {last!r}: data_offsets "
        f"[{begin + 64}, {end + 64}] lie outside the data section ({end} bytes) "
        f"{DAMAGED}",
    )


def test_refuses_overlapping_tensors(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf", copy=(SHARD2,))
    header = read_safetensors_header(hf / SHARD2)
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    a, b = names[0], names[1]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
    replace_safetensors_header(hf / SHARD2, header)
    first, second = sorted(
        [a, b], key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1])
    )
    assert_refused(
        hf,
        tmp_path,
        f"Error: {hf / SHARD2}: tensors {first!r} and {second!r} "
        f"overlap in the data section {DAMAGED}",
    )


def test_refuses_pickle_only_weights(tiny, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny[1] / name, hf / name)
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert_refused(
        hf,
        tmp_path,
        f"Error: {hf} holds only pickle weights (pytorch_model.bin); "
        "mathq reads safetensors only (download the model's *.safetensors files "
        "instead; pickle files can run code when loaded)",
    )


def test_refuses_missing_tokenizer(tiny, tmp_path):
    hf = clone(tiny[1], tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    assert_refused(
        hf,
        tmp_path,
        f"Error: no tokenizer.json in {hf} (no tokenizer) (download "
        "the model's tokenizer.json and tokenizer_config.json)",
    )


def test_normalised_pre_tokenizer_is_unknown_and_fails_verification(tiny, tmp_path):
    """A tokenizer.json whose KELVIN SIGN went through NFC (see the fixture's README).

    The letter class's range K-ℭ (U+212A-U+212D) becomes K-ℭ (U+004B-U+212D), which
    swallows backslash, braces and lowercase letters: LaTeX tokenizes differently.
    """
    hf = clone(tiny[1], tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    data = json.loads((tiny[1] / "tokenizer.json").read_text(encoding="utf-8"))
    kelvin = "\u212a"
    assert unicodedata.normalize("NFC", kelvin) == "K"
    letters = data["pre_tokenizer"]["pretokenizers"][1]["pattern"]
    assert kelvin + "-" in letters["Regex"]
    letters["Regex"] = letters["Regex"].replace(kelvin + "-", "K-")
    (hf / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    result = run("convert", str(hf), "--out", str(tmp_path / "out.gguf"), code=1)
    line = result.output.strip()
    assert line.startswith(f"Error: {hf}/tokenizer.json: unknown pre-tokenizer (signature ")
    assert line.endswith(
        "(name llama.cpp's pre-tokenizer for it with --pre-tokenizer, e.g. "
        "--pre-tokenizer deepseek-llm; verification will check the choice)"
    )
    out = tmp_path / "forced.gguf"
    result = run("convert", str(hf), "--out", str(out), "--pre-tokenizer", "deepseek-llm", code=1)
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: verification failed: llama.cpp tokenizes ")
    assert "differently from tokenizer.json" in line
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_convert_recipe_into_build_folder_and_manifest(tiny, tiny_reader, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        '[model]\nname = "tiny-math"\nlocal_dir = "' + str(tiny[1]) + '"\nkind = "chat"\n'
        'license_name = "MIT"\nlicense_url = "https://example.org"\n'
        'pre_tokenizer = "deepseek-llm"\n'
        '[prompt]\ntemplate = "deepseek-chat"\n[quants]\nvariants = ["Q4_K_M"]\n'
        '[ollama]\nmodel = "tiny-math"\n[ollama.tags]\nlatest = "Q4_K_M"\n[smoke]\n',
        encoding="utf-8",
    )
    build = tmp_path / "build"
    data = json.loads(
        run("convert", str(recipe), "--build-dir", str(build), "--no-verify", "--json").output
    )
    out = build / "tiny-math" / "tiny-math-BF16.gguf"
    assert data["path"] == str(out) and out.is_file()
    assert data["pre_tokenizer"] == "deepseek-llm"
    assert data["pre_tokenizer_source"] == "recipe"
    assert data["verification"] is None
    manifest = json.loads((build / "tiny-math" / "manifest.json").read_text())
    record = manifest["artifacts"]["tiny-math-BF16.gguf"]
    assert record["stage"] == "convert" and record["size"] == out.stat().st_size
    assert record["settings"] == {
        "outtype": "bf16",
        "pre_tokenizer": "deepseek-llm",
        "verified": False,
    }
    files = record["inputs"]["files"]
    assert set(files) >= {"config.json", "tokenizer.json", SHARD2, "model.safetensors.index.json"}
    assert len(files[SHARD2]["header_sha256"]) == 64
    # The same file as converting the folder directly (metadata name aside, same tensors).
    reader = GGUFReader(out)
    assert [t.name for t in reader.tensors] == [t.name for t in tiny_reader.tensors]
    assert reader.fields["general.name"].contents() == "tiny-math"


# ---- the tables: config.json and the tensor map -----------------------------------------


def config(**changes):
    from tests.tinymodel import config_json

    return {**config_json(TinySpec()), **changes}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "rope_scaling type 'llama3' is not supported by mathq's converter",
        ),
        ({"attention_bias": True}, "attention_bias/mlp_bias is not supported by mathq's converter"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported by mathq's converter"),
        (
            {"num_key_value_heads": 3},
            "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        ),
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ],
)
def test_config_refusals_name_the_field(changes, problem):
    from mathq.convert.hfconfig import parse_hparams
    from mathq.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        parse_hparams(config(**changes), Path("hf/config.json"))
    assert e.value.message == f"hf/config.json: {problem}"


def test_config_defaults_are_llama_configs():
    from mathq.convert.hfconfig import parse_hparams

    bare = config()
    for key in ("num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
        del bare[key]
    hp = parse_hparams(bare, Path("config.json"))
    assert (hp.n_head_kv, hp.rope_theta, hp.rms_norm_eps, hp.n_ctx, hp.head_dim) == (
        4,
        10000.0,
        1e-6,
        2048,
        16,
    )


def test_tensor_map_drops_inv_freq_and_refuses_strangers():
    from mathq.convert.hfconfig import parse_hparams
    from mathq.convert.tensor_map import Transform, match_tensors
    from mathq.errors import CheckpointError
    from tests.tinymodel import tensor_shapes

    spec = TinySpec().gqa()
    hp = parse_hparams(config(num_key_value_heads=2), Path("config.json"))
    found = dict(tensor_shapes(spec))
    found["model.layers.0.self_attn.rotary_emb.inv_freq"] = (8,)
    plan = {m.hf_name: m for m in match_tensors(hp, found, "ckpt")}
    assert len(plan) == len(found) - 1
    k = plan["model.layers.1.self_attn.k_proj.weight"]
    assert (k.gguf_name, k.shape, k.transform, k.n_head) == (
        "blk.1.attn_k.weight",
        (32, 64),
        Transform.PERMUTE_K,
        2,
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.extra\.weight in ckpt"):
        match_tensors(hp, {**found, "model.extra.weight": (1,)}, "ckpt")
    with pytest.raises(CheckpointError, match=r"has shape \[64, 64\], config\.json implies"):
        match_tensors(hp, {**found, "model.layers.0.self_attn.k_proj.weight": (64, 64)}, "ckpt")
    missing = dict(found)
    del missing["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight is missing from ckpt"):
        match_tensors(hp, missing, "ckpt")


def test_permute_matches_the_documented_formula():
    w = np.arange(8 * 3).reshape(8, 3)
    n_head = 2
    want = w.reshape(n_head, 2, 8 // n_head // 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert np.array_equal(permute_rows(w, n_head), want)
    # head 0 rows [0,1 | 2,3] interleave to 0,2,1,3
    assert permute_rows(w, n_head)[:4, 0].tolist() == [0, 6, 3, 9]


def test_hf_dir_default_output_is_dirname_bf16_in_cwd(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run("convert", str(tiny[1]), "--no-verify").output
    assert (tmp_path / "hf-BF16.gguf").is_file()
    assert out.startswith(f"Wrote {tmp_path / 'hf-BF16.gguf'} (")
    assert "pre-tokenizer deepseek-llm (from tokenizer.json), 100015 tokens padded to 102400" in out
    assert "not verified (--no-verify)" in out
