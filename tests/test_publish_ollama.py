"""``mathq publish`` to Ollama, against a local server that checks digests as Ollama does.

The GGUFs are real (llama.cpp quantized a tiny LLaMA to Q4_K_M and Q8_0); the server is
tests/ollamaserver.py on 127.0.0.1. Each test reads what the server received: blob bytes
and digests, create bodies, pushes, and the full request log.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from mathq.errors import InvalidNameError, ModelfileError
from mathq.layout import BuildLayout
from mathq.modelfile.gotemplate import go_template
from mathq.progress import Progress
from mathq.publish.ollama import create_request, plan_ollama, publish_ollama
from mathq.publish.ollama_api import ollama_base_url
from mathq.publish.plan import sha256_cached
from mathq.recipes.prompt import EOS
from mathq.recipes.recipe import load_recipe
from tests.clirun import run
from tests.ollamaserver import FAKE_KEY, FakeOllama
from tests.publishkit import build_folder, write_recipe

NAMES = ["me/tiny:latest", "me/tiny:q8", "me/tiny:q4"]


@pytest.fixture
def setup(tmp_path: Path, tiny_quantized: dict[str, Path]):
    recipe = write_recipe(tmp_path)
    root = build_folder(tmp_path / "build", tiny_quantized)
    with FakeOllama() as fake:
        yield recipe, root, fake


def publish(recipe: Path, root: Path, fake: FakeOllama, *args: str, code: int = 0):
    return run("publish", str(recipe), "--build-dir", str(root), "--ollama-host", fake.url,
               *args, code=code)


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_uploads_each_file_once_creates_and_pushes_every_tag(setup, tiny_quantized):
    recipe, root, fake = setup
    out = publish(recipe, root, fake, "--namespace", "me").output
    q4, q8 = sha(tiny_quantized["Q4_K_M"]), sha(tiny_quantized["Q8_0"])
    assert out.splitlines() == [
        "me/tiny:latest  blob uploaded, created, pushed",
        "me/tiny:q8      blob uploaded, created, pushed",
        "me/tiny:q4      blob present, created, pushed",
        f"Ollama at {fake.url}: 3 tag(s), "
        f"{_mib(sum(p.stat().st_size for p in tiny_quantized.values()))}"
        " uploaded",
        # Nothing was measured, so the report picks nothing and publish invents nothing.
        "No tag is recommended: the build's report picks none of these files (see "
        "`mathq report`)."]
    # Each file went up once, as its exact bytes, after a HEAD said the server lacked it.
    assert fake.blobs[q4] == tiny_quantized["Q4_K_M"].read_bytes()
    assert fake.blobs[q8] == tiny_quantized["Q8_0"].read_bytes()
    assert [r.path for r in fake.sent("POST", "/api/blobs/")] == [f"/api/blobs/{q4}",
                                                                 f"/api/blobs/{q8}"]
    assert [r.path for r in fake.sent("HEAD", "/api/blobs/")] == [f"/api/blobs/{q4}",
                                                                 f"/api/blobs/{q8}"]
    # The create request is the Modelfile's content, typed as Ollama's client types it.
    spec = load_recipe(recipe)
    body = fake.models["me/tiny:latest"]
    assert body == {
        "model": "me/tiny:latest", "files": {"tiny-Q4_K_M.gguf": q4}, "stream": True,
        "template": go_template(spec.prompt),
        "parameters": {"temperature": 0.0, "repeat_penalty": 1.0, "num_predict": 512,
                       "num_ctx": 4096, "stop": [EOS, "User:"]},
        "license": ["DeepSeek License\nhttps://github.com/deepseek-ai/DeepSeek-Math/blob/main/"
                    "LICENSE-MODEL"]}
    assert fake.models["me/tiny:q8"]["files"] == {"tiny-Q8_0.gguf": q8}
    assert sorted(fake.registry) == sorted(NAMES)
    assert fake.registry["me/tiny:q4"][0] == q4


def _mib(n: int) -> str:
    from mathq.fsutil import format_bytes

    return format_bytes(n)


def test_rerun_sends_nothing_twice(setup):
    recipe, root, fake = setup
    publish(recipe, root, fake, "--namespace", "me")
    before = len(fake.requests)
    out = publish(recipe, root, fake, "--namespace", "me").output
    assert out.splitlines()[:3] == [f"{n:<14}  blob not needed, unchanged, unchanged"
                                    for n in NAMES]
    again = fake.requests[before:]
    assert [(r.method, r.path) for r in again] == [("GET", "/api/version"),
                                                   *[("POST", "/api/show")] * 3]
    # A model removed from the server is created (its blob is still there) and pushed again.
    del fake.models["me/tiny:q8"]
    before = len(fake.requests)
    out = publish(recipe, root, fake, "--namespace", "me").output
    assert "me/tiny:q8      blob present, created, pushed" in out.splitlines()
    sent = [(r.method, r.path) for r in fake.requests[before:]]
    assert ("POST", "/api/create") in sent and ("POST", "/api/push") in sent
    assert not fake.sent("POST", "/api/blobs/")[2:]


def test_changed_recipe_recreates_without_resending_blobs(setup, tmp_path):
    recipe, root, fake = setup
    publish(recipe, root, fake, "--namespace", "me")
    write_recipe(tmp_path, num_predict=256)
    out = publish(recipe, root, fake, "--namespace", "me").output
    assert out.splitlines()[0] == "me/tiny:latest  blob present, created, pushed"
    assert fake.models["me/tiny:latest"]["parameters"]["num_predict"] == 256
    assert len(fake.sent("POST", "/api/blobs/")) == 2  # from the first run only
    assert len(fake.sent("POST", "/api/create")) == 6
    assert len(fake.sent("POST", "/api/push")) == 6


def test_no_push_creates_local_models_on_the_host_from_ollama_host_env(
        setup, monkeypatch):
    recipe, root, fake = setup
    monkeypatch.setenv("OLLAMA_HOST", fake.url)
    out = run("publish", str(recipe), "--build-dir", str(root), "--no-push",
              "--tag", "latest,q8").output
    assert out.splitlines()[:2] == ["tiny:latest  blob uploaded, created, not pushed",
                                    "tiny:q8      blob uploaded, created, not pushed"]
    assert sorted(fake.models) == ["tiny:latest", "tiny:q8"]
    assert not fake.sent("POST", "/api/push") and not fake.registry
    result = json.loads(run("publish", str(recipe), "--build-dir", str(root), "--no-push",
                            "--tag", "q8", "--json").output)
    assert result["ollama"]["base_url"] == fake.url and result["hub"] is None
    assert result["ollama"]["tags"] == [{
        "tag": "q8", "name": "tiny:q8", "digest": fake.models["tiny:q8"]["files"]["tiny-Q8_0.gguf"],
        "blob": "not needed", "create": "unchanged", "push": "not pushed",
        "recommended": False}]
    assert result["ollama"]["recommended"] is None


def test_progress_streams_bytes_and_server_statuses(setup, tiny_quantized):
    recipe, root, fake = setup
    events: list[Progress] = []
    plan = plan_ollama(load_recipe(recipe), namespace="me", base_url=fake.url, tags=["q8"],
                       build_root=root, progress=events.append)
    size = tiny_quantized["Q8_0"].stat().st_size
    assert events[-1] == Progress("sha256", size, size, "B", item="tiny-Q8_0.gguf")
    events.clear()
    publish_ollama(plan, build_root=root, progress=events.append)
    uploads = [e for e in events if e.stage == "upload"]
    assert uploads[0].done == 0 and uploads[-1] == Progress("upload", size, size, "B",
                                                            item="tiny-Q8_0.gguf")
    assert len(uploads) > 3  # streamed in chunks, not read whole
    creates = [e.info for e in events if e.stage == "create"]
    assert creates[0] == "parsing GGUF" and creates[-2:] == ["writing manifest", "success"]
    pushes = [e for e in events if e.stage == "push"]
    assert pushes[0].info == "retrieving manifest" and pushes[-1].info == "success"
    digest = plan.tags[0].digest
    assert Progress("push", size, size, "B", item="me/tiny:q8",
                    info=f"pushing {digest[7:19]}...") in pushes


def test_dry_run_prints_everything_and_sends_nothing(setup, tiny_quantized):
    recipe, root, fake = setup
    out = publish(recipe, root, fake, "--namespace", "me", "--dry-run").output
    assert fake.requests == []
    q4 = sha(tiny_quantized["Q4_K_M"])
    assert out.startswith("Dry run: nothing is sent.\n")
    assert f"  upload blob {q4}  " in out
    assert out.count("  upload blob ") == 2
    for name in NAMES:
        assert f"  create {name}  from " in out and f"  push {name}\n" in out
        assert f"--- Modelfile of {name} ---\n# Generated by mathq" in out
    # The printed request is exactly what a real run sends.
    start = out.index("--- POST /api/create for me/tiny:q8 ---\n") + len(
        "--- POST /api/create for me/tiny:q8 ---\n")
    printed = json.JSONDecoder().raw_decode(out[start:])[0]
    publish(recipe, root, fake, "--namespace", "me")
    assert printed == fake.models["me/tiny:q8"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--namespace", "my ns",
     "namespace 'my ns' contains ' '; use only letters, digits, '_', '.', '-'"),
    ("--namespace", "-me", "namespace '-me' must start with a letter, digit or '_'"),
    ("--namespace", "n" * 81, f"namespace '{'n' * 81}' is 81 characters; Ollama allows at most 80"),
    ("--tag", "latest,bad:tag",
     "tag 'bad:tag' contains ':'; use only letters, digits, '_', '.', '-'"),
])
def test_bad_names_are_refused_before_any_request(setup, option, value, message):
    recipe, root, fake = setup
    args = ["--namespace", "me", option, value] if option == "--tag" else [option, value]
    result = publish(recipe, root, fake, *args, code=2)
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {message}"
    assert fake.requests == []


def test_library_checks_names_too(setup):
    recipe, root, fake = setup
    with pytest.raises(InvalidNameError, match="namespace 'a/b' contains '/'"):
        plan_ollama(load_recipe(recipe), namespace="a/b", base_url=fake.url, build_root=root)
    with pytest.raises(InvalidNameError, match="pushing needs a namespace"):
        plan_ollama(load_recipe(recipe), namespace=None, base_url=fake.url, build_root=root)


def test_unknown_tag_and_missing_gguf_fail_before_any_request(setup):
    recipe, root, fake = setup
    result = publish(recipe, root, fake, "--namespace", "me", "--tag", "q5", code=2)
    assert result.output.splitlines() == [
        "Error: recipe tiny has no Ollama tag 'q5' (its tags are latest, q8, q4)"]
    missing = root / "tiny" / "tiny-Q8_0.gguf"
    missing.unlink()
    result = publish(recipe, root, fake, "--namespace", "me", code=1)
    assert result.output.splitlines() == [
        f"Error: {missing} not found (make it with `mathq quantize {recipe} --quant Q8_0`)"]
    assert fake.requests == []


def test_a_gguf_of_another_type_than_its_name_is_refused(setup, tiny_quantized):
    recipe, root, fake = setup
    wrong = root / "tiny" / "tiny-Q8_0.gguf"
    wrong.unlink()
    os.link(tiny_quantized["Q4_K_M"], wrong)
    result = publish(recipe, root, fake, "--namespace", "me", code=1)
    assert result.output.splitlines() == [
        f"Error: {wrong} holds Q4_K_M, not Q8_0 (rebuild it with "
        f"`mathq quantize {recipe} --quant Q8_0`)"]
    assert fake.requests == []


def test_push_without_a_registered_key_is_explained_and_a_rerun_only_pushes(setup):
    recipe, root, fake = setup
    fake.refuse_push("unknown-key")
    result = publish(recipe, root, fake, "--namespace", "me", code=1)
    assert result.output.splitlines() == [
        "Error: the registry refused to push me/tiny:latest: the public key of the Ollama "
        f"server at {fake.url} is not registered with an ollama.com account (add "
        "~/.ollama/id_ed25519.pub of the machine running `ollama serve` at "
        "https://ollama.com/settings/keys, then rerun)"]
    assert FAKE_KEY not in result.output
    assert list(fake.models) == ["me/tiny:latest"] and not fake.registry
    fake.refuse_push(None)
    before = len(fake.requests)
    out = publish(recipe, root, fake, "--namespace", "me").output
    assert out.splitlines()[0] == "me/tiny:latest  blob not needed, unchanged, pushed"
    sent = [(r.method, r.path) for r in fake.requests[before:]]
    assert sent.count(("POST", "/api/create")) == 2  # q8 and q4 only
    assert sorted(fake.registry) == sorted(NAMES)


def test_push_to_a_namespace_not_owned_is_explained(setup):
    recipe, root, fake = setup
    fake.refuse_push("access-denied")
    result = publish(recipe, root, fake, "--namespace", "someone", code=1)
    assert result.output.splitlines() == [
        "Error: the registry refused to push someone/tiny:latest (unauthorized: access denied) "
        "(push to a namespace your ollama.com account owns (--namespace <your user name>), "
        "from a server whose key is registered at https://ollama.com/settings/keys)"]


def test_unreachable_server(setup):
    recipe, root, _fake = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run("publish", str(recipe), "--build-dir", str(root), "--ollama-host", url,
                 "--namespace", "me", code=1)
    assert result.output.splitlines() == [
        f"Error: cannot connect to Ollama at {url} (start it with `ollama serve`, or point "
        "--ollama-host (or OLLAMA_HOST) at the server)"]


def test_digest_mismatch_is_an_error_and_the_rerun_rehashes(tmp_path, tiny_quantized):
    recipe = write_recipe(tmp_path)
    root = build_folder(tmp_path / "build", tiny_quantized, copy=True)
    gguf = root / "tiny" / "tiny-Q8_0.gguf"
    with FakeOllama() as fake:
        # an earlier run's digest cache (a dry run writes none)
        sha256_cached(gguf, BuildLayout.for_model("tiny", root).digest_cache)
        st = gguf.stat()
        with open(gguf, "r+b") as f:  # changed in place, size and mtime kept
            f.seek(st.st_size - 1)
            last = f.read(1)
            f.seek(st.st_size - 1)
            f.write(bytes([last[0] ^ 1]))
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
        result = publish(recipe, root, fake, "--namespace", "me", "--tag", "q8", code=1)
        line = result.output.splitlines()[-1]
        assert line.startswith(f"Error: Ollama at {fake.url} received other bytes for "
                               "tiny-Q8_0.gguf than mathq hashed (digest mismatch, expected ")
        assert line.endswith("(the file changed after it was hashed; rerun, and mathq "
                             "hashes it again)")
        assert sha(gguf) not in fake.blobs and not fake.models
        publish(recipe, root, fake, "--namespace", "me", "--tag", "q8")
        assert fake.blobs[sha(gguf)] == gguf.read_bytes()


def test_create_request_runs_the_modelfile_validator_first():
    text = ('FROM ./x.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER temperature 0\n'
            "PARAMETER top_k 40\nPARAMETER stop a\nPARAMETER stop b\nPARAMETER use_mmap true\n"
            "LICENSE MIT\n")
    body = create_request("m:t", text, {"x.gguf": "sha256:" + "0" * 64})
    assert body == {"model": "m:t", "files": {"x.gguf": "sha256:" + "0" * 64},
                    "template": "{{ .Prompt }}", "license": ["MIT"],
                    "parameters": {"temperature": 0.0, "top_k": 40, "stop": ["a", "b"],
                                   "use_mmap": True}}
    with pytest.raises(ModelfileError, match="line 2: unknown parameter 'temprature'"):
        create_request("m:t", "FROM ./x.gguf\nPARAMETER temprature 0\n", {})


@pytest.mark.parametrize(("value", "url"), [
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://0.0.0.0:11434"),
    ("gpu-box:8080", "http://gpu-box:8080"),
    ("http://gpu-box", "http://gpu-box:80"),
    ("https://ollama.example/", "https://ollama.example:443"),
    ("[::1]:11500", "http://[::1]:11500"),
    ("::1", "http://[::1]:11434"),
    ("http://h:1/prefix/", "http://h:1/prefix"),
])
def test_ollama_host_is_read_as_ollama_reads_it(value, url, monkeypatch):
    assert ollama_base_url(value) == url
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert ollama_base_url() == url


def test_digests_are_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 5_000_000)
    cache = tmp_path / "digests.json"
    events: list[Progress] = []
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_cached(f, cache, events.append) == want
    assert events[-1] == Progress("sha256", 5_000_000, 5_000_000, "B", item="x.bin")
    events.clear()
    assert sha256_cached(f, cache, events.append) == want and events == []
    f.write_bytes(b"b" * 5_000_000)  # same size, another mtime
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000_000))
    assert sha256_cached(f, cache, events.append) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert events


def test_gguf_header_reader_agrees_with_gguf_py(tmp_path):
    import gguf
    import numpy as np

    from mathq.convert.gguf_info import read_gguf_header, read_gguf_summary
    from mathq.errors import GGUFError

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_file_type(7)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(3000)] + ["é", ""])
    w.add_array("tokenizer.ggml.scores", [0.5] * 100)
    w.add_array("x.bools", [True, False])
    w.add_uint64("x.u64", 2**40)
    w.add_float64("x.f64", 0.25)
    w.add_bool("x.flag", True)
    w.add_string("x.text", "ünïcode")
    w.add_tensor("a", np.ones((3, 64), np.float32))
    w.add_tensor("b", np.ones((5,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header, s = read_gguf_header(path), read_gguf_summary(path)
    h = header.summary
    assert (h.architecture, h.file_type, h.n_params, len(h.tensors), h.size) == (
        s.architecture, s.file_type, s.n_params, len(s.tensors), s.size) == (
        "llama", 7, 197, 2, path.stat().st_size)
    assert h.tensors == s.tensors
    assert h.file_type_name == "Q8_0" and h.bits_per_weight == s.bits_per_weight
    assert {k: header.values[k] for k in ("x.u64", "x.f64", "x.flag", "x.text")} == {
        "x.u64": 2**40, "x.f64": 0.25, "x.flag": True, "x.text": "ünïcode"}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(GGUFError, match=r"cut\.gguf is cut short: it ends \(at byte \d+\)"):
        read_gguf_header(cut)
    cut.write_bytes(b"not a gguf")
    with pytest.raises(GGUFError, match=r"cut\.gguf is not a GGUF file"):
        read_gguf_header(cut)
    cut.write_bytes(path.read_bytes()[:4] + (4).to_bytes(4, "little") + path.read_bytes()[8:])
    with pytest.raises(GGUFError, match=r"cut\.gguf is GGUF version 4; mathq reads 2 and 3"):
        read_gguf_header(cut)
