"""``mathq download`` against a local fake Hub (tests/hubserver.py) with the real client.

Each test builds a tiny DeepSeek-shaped checkpoint (Llama config, the DeepSeek tokenizer
fixture, two bf16 safetensors shards and their index), serves it from 127.0.0.1 and
downloads it with huggingface_hub for real: repo info, resolve, the CDN redirect, Range.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.download.fetch import STATE_FILE, DownloadRequest, download_checkpoint
from mathq.download.stage import download_recipe
from mathq.errors import CheckpointError, DiskSpaceError, DownloadError, IntegrityError, RecipeError
from mathq.fsutil import PARTIAL_SUFFIX, format_bytes
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.progress import Progress
from mathq.recipes.recipe import load_recipe
from tests.conftest import FIXTURES
from tests.hubserver import FakeHub

REPO = "deepseek-ai/deepseek-math-7b-rl"  # the bundled recipe's repo, served by the fake Hub
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in chunks of this size


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file; uint16 arrays are stored as BF16 (numpy has no bfloat16)."""
    dtypes = {np.dtype(np.uint16): "BF16", np.dtype(np.float32): "F32"}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def tiny_checkpoint(*, hidden: int = 8, seed: int = 0, big_head: bool = False) -> dict[str, bytes]:
    """A 2-layer Llama with DeepSeek's vocabulary, in two shards, as the Hub would hold it.

    ``big_head`` makes the output head F32 and wide, so shard 2 exceeds one 10 MiB download
    chunk and a transfer can be cut after bytes were written.
    """
    rng = np.random.default_rng(seed)
    vocab, ffn = 102400, 2 * hidden

    def bf16(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(
            np.uint16)

    layers = {}
    for i in range(2):
        p = f"model.layers.{i}."
        layers[i] = {p + "input_layernorm.weight": bf16(hidden),
                     p + "self_attn.q_proj.weight": bf16(hidden, hidden),
                     p + "self_attn.k_proj.weight": bf16(hidden, hidden),
                     p + "self_attn.v_proj.weight": bf16(hidden, hidden),
                     p + "self_attn.o_proj.weight": bf16(hidden, hidden),
                     p + "post_attention_layernorm.weight": bf16(hidden),
                     p + "mlp.gate_proj.weight": bf16(ffn, hidden),
                     p + "mlp.up_proj.weight": bf16(ffn, hidden),
                     p + "mlp.down_proj.weight": bf16(hidden, ffn)}
    head = (rng.standard_normal((vocab, 32), dtype=np.float32) if big_head
            else bf16(vocab, hidden))
    shard1 = {"model.embed_tokens.weight": bf16(vocab, hidden), **layers[0]}
    shard2 = {**layers[1], "model.norm.weight": bf16(hidden), "lm_head.weight": head}
    weight_map = {**dict.fromkeys(shard1, SHARD1), **dict.fromkeys(shard2, SHARD2)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": 2,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": vocab,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 100000, "eos_token_id": 100001}
    tok = FIXTURES / "deepseek-llm-tokenizer"
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# tiny deepseek-shaped test model\n",
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": b'{"bos_token_id": 100000, "eos_token_id": 100001}\n',
        "tokenizer.json": (tok / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (tok / "tokenizer_config.json").read_bytes(),
        INDEX: json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
        SHARD1: safetensors_bytes(shard1),
        SHARD2: safetensors_bytes(shard2),
    }


FETCHED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           INDEX, SHARD1, SHARD2)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A running fake Hub; HF_ENDPOINT points at it and no stored login can leak in."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def fetch(dest, revision="main", repo=REPO, **kw):
    return download_checkpoint(DownloadRequest(repo, revision), dest, **kw)


def transfers(hub: FakeHub) -> list[str]:
    """Paths of the GETs that moved file bytes (resolve of small files, CDN of LFS files)."""
    return [r.path for r in hub.requests if r.method == "GET" and "/api/" not in r.path]


def assert_same_files(dest, files: dict[str, bytes], names=FETCHED):
    on_disk = sorted(p.name for p in dest.iterdir() if not p.name.startswith(".mathq"))
    assert on_disk == sorted(names)
    for name in names:
        assert (dest / name).read_bytes() == files[name], name


def test_full_download_verifies_records_and_skips_the_rest(hub, tmp_path):
    files = tiny_checkpoint()
    commit = hub.add_repo(REPO, files)
    dest, manifest = tmp_path / "hf", Manifest(tmp_path / "manifest.json")
    events: list[Progress] = []

    result = fetch(dest, manifest=manifest, progress=events.append)

    assert result.commit == commit
    assert_same_files(dest, files)  # README.md and .gitattributes are not fetched
    total = sum(len(files[n]) for n in FETCHED)
    assert result.total_bytes == result.fetched_bytes == total
    downloads = [e for e in events if e.stage == "download"]
    assert [e.done for e in downloads] == sorted(e.done for e in downloads)
    # one bar for the whole transfer (the index, a few KB, is fetched silently first)
    assert downloads[-1].done == downloads[-1].total == total - len(files[INDEX])
    record = manifest.get("hf")
    assert record is not None and record.stage == "download"
    assert record.inputs["repo"] == REPO and record.inputs["commit"] == commit
    assert record.settings == {"revision": "main"}
    assert record.inputs["files"][SHARD2] == {
        "size": len(files[SHARD2]), "digest": "sha256:" + hashlib.sha256(files[SHARD2]).hexdigest()}
    assert record.inputs["files"]["config.json"]["digest"].startswith("git-sha1:")

    # LFS files came through the CDN redirect, small files straight from resolve.
    assert any(p.startswith("/cdn/") for p in transfers(hub))
    assert f"/{REPO}/resolve/{commit}/config.json" in transfers(hub)

    hub.requests.clear()
    again = fetch(dest, manifest=manifest)
    assert again.fetched_bytes == 0 and transfers(hub) == []


def test_pinned_revision_and_moving_to_another(hub, tmp_path):
    old = tiny_checkpoint(seed=1)
    first = hub.add_repo(REPO, old)
    new = {**old, SHARD2: tiny_checkpoint(seed=2)[SHARD2],
           "config.json": old["config.json"].replace(b'"rope_theta": 10000.0',
                                                     b'"rope_theta": 10000.5')}
    second = hub.commit(REPO, new)
    hub.tag(REPO, "v1", first)
    dest, manifest = tmp_path / "hf", Manifest(tmp_path / "manifest.json")

    assert fetch(dest, revision=first, manifest=manifest).commit == first
    assert_same_files(dest, old)
    assert manifest.get("hf").inputs["commit"] == first
    assert manifest.get("hf").settings == {"revision": first}
    assert fetch(dest, revision="v1").fetched_bytes == 0  # a tag resolves to the same commit

    moved = fetch(dest, revision="main", manifest=manifest)
    assert moved.commit == second
    assert_same_files(dest, new)
    assert moved.fetched_bytes == len(new[SHARD2]) + len(new["config.json"])
    assert manifest.get("hf").inputs["commit"] == second

    # A revision with one unsharded file: the old shards and index are ours, so they go.
    single = {k: v for k, v in new.items() if k not in (SHARD1, SHARD2, INDEX)}
    single["model.safetensors"] = new[SHARD1]
    hub.commit(REPO, single)
    fetch(dest)
    names = [n for n in FETCHED if n not in (SHARD1, SHARD2, INDEX)] + ["model.safetensors"]
    assert_same_files(dest, single, names)


def test_finished_files_are_trusted_only_while_unchanged(hub, tmp_path):
    files = tiny_checkpoint()
    hub.add_repo(REPO, files)
    dest = tmp_path / "hf"
    fetch(dest)

    (dest / STATE_FILE).unlink()  # no record of what was verified: hash, then trust
    hub.requests.clear()
    assert fetch(dest).fetched_bytes == 0 and transfers(hub) == []

    tampered = bytearray(files[SHARD1])
    tampered[100] ^= 1
    (dest / SHARD1).write_bytes(bytes(tampered))  # same size, new mtime: hashed again
    assert fetch(dest).fetched_bytes == len(files[SHARD1])
    assert_same_files(dest, files)


def test_big_files_report_their_verification(hub, tmp_path, monkeypatch):
    import mathq.download.fetch

    monkeypatch.setattr(mathq.download.fetch, "VERIFY_PROGRESS_MIN", 1 << 20)
    files = tiny_checkpoint()
    hub.add_repo(REPO, files)
    events: list[Progress] = []
    fetch(tmp_path / "hf", progress=events.append)
    verified = {e.item: e for e in events if e.stage == "verify"}
    # files of 1 MiB or more report hashing; config.json and the like are hashed silently
    assert set(verified) == {SHARD1, SHARD2, "tokenizer.json"}
    assert all(e.done == e.total == len(files[e.item]) for e in verified.values())


def test_one_download_per_folder(hub, tmp_path):
    import fcntl

    hub.add_repo(REPO, tiny_checkpoint())
    dest = tmp_path / "hf"
    dest.mkdir()
    with open(dest / ".mathq-download.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DownloadError) as e:
            fetch(dest)
    assert str(e.value) == (f"another download is writing to {dest} "
                            "(wait for it to finish, or use another --dir)")


def test_unknown_revision_names_the_flag(hub, tmp_path):
    hub.add_repo(REPO, tiny_checkpoint())
    with pytest.raises(DownloadError) as e:
        fetch(tmp_path / "hf", revision="v9")
    assert str(e.value) == (f"revision 'v9' not found in {REPO} on {hub.url} "
                            "(pass an existing branch, tag or commit with --revision)")


def test_transfer_cut_mid_file_is_resumed_with_a_range_request(hub, tmp_path):
    files = tiny_checkpoint(big_head=True)
    assert len(files[SHARD2]) > CHUNK + 4096
    hub.add_repo(REPO, files)
    hub.cut(SHARD2, after=CHUNK + 4096)  # the connection drops once; the client retries

    result = fetch(tmp_path / "hf")

    assert_same_files(tmp_path / "hf", files)
    cdn = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    assert [r.headers.get("range") for r in cdn][-2:] == [None, f"bytes={CHUNK}-"]
    assert result.fetched_bytes == sum(len(files[n]) for n in FETCHED)


def test_interrupted_download_resumes_on_the_next_run(hub, tmp_path):
    files = tiny_checkpoint(big_head=True)
    hub.add_repo(REPO, files)
    hub.cut(SHARD2, after=CHUNK + 4096, then_status=503)  # storage goes down mid-file
    dest, manifest = tmp_path / "hf", Manifest(tmp_path / "manifest.json")

    with pytest.raises(DownloadError) as e:
        fetch(dest, manifest=manifest)
    assert str(e.value) == (f"{hub.url} answered HTTP 503 for {REPO} "
                            "(try again later; finished files are kept and a rerun resumes)")
    assert not (dest / SHARD2).exists()
    assert (dest / (SHARD2 + PARTIAL_SUFFIX)).stat().st_size == CHUNK
    assert (dest / SHARD1).read_bytes() == files[SHARD1]
    assert manifest.get("hf") is None  # an incomplete folder is never recorded

    hub.heal(SHARD2)
    hub.requests.clear()
    result = fetch(dest, manifest=manifest)

    assert_same_files(dest, files)
    assert result.fetched_bytes == len(files[SHARD2]) - CHUNK
    assert [r.headers.get("range") for r in hub.requests if r.path.startswith("/cdn/")] == [
        f"bytes={CHUNK}-"]
    assert manifest.get("hf") is not None


def test_partial_left_by_another_version_is_fetched_whole(hub, tmp_path):
    files = tiny_checkpoint()
    hub.add_repo(REPO, files)
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / ("config.json" + PARTIAL_SUFFIX)).write_bytes(b'{"hidden_size": 4096,')

    fetch(dest)

    assert_same_files(dest, files)
    ranges = [r.headers.get("range") for r in hub.requests if r.path.endswith("/config.json")]
    assert ranges == ["bytes=21-", None]


def test_bytes_that_do_not_match_the_hash_are_refused_and_deleted(hub, tmp_path):
    files = tiny_checkpoint()
    hub.add_repo(REPO, files)
    bad = bytearray(files[SHARD2])
    bad[-1] ^= 0xFF
    hub.corrupt(SHARD2, bytes(bad))
    dest = tmp_path / "hf"

    with pytest.raises(IntegrityError) as e:
        fetch(dest)
    assert e.value.message.startswith(f"{SHARD2} from {REPO} at ")
    assert "does not match its hash: got sha256:" in e.value.message
    assert e.value.hint == "the bad copy was deleted; rerun to fetch it again"
    assert not (dest / SHARD2).exists() and not (dest / (SHARD2 + PARTIAL_SUFFIX)).exists()

    hub.heal(SHARD2)
    assert fetch(dest).fetched_bytes == len(files[SHARD2])
    assert_same_files(dest, files)


def test_index_naming_a_missing_shard_is_refused_before_the_weights(hub, tmp_path):
    files = tiny_checkpoint()
    del files[SHARD2]
    commit = hub.add_repo(REPO, files)

    with pytest.raises(CheckpointError) as e:
        fetch(tmp_path / "hf")
    assert str(e.value) == (
        f"{INDEX} names {SHARD2}, which {REPO} at {commit[:12]} does not have "
        "(the checkpoint is incomplete at this revision; choose another with --revision)")
    assert not any(p.startswith("/cdn/") for p in transfers(hub))


def test_pickle_only_repo_is_refused(hub, tmp_path):
    files = tiny_checkpoint()
    pickled = {"config.json": files["config.json"], "tokenizer.json": files["tokenizer.json"],
               "pytorch_model.bin": b"\x80\x04\x95 not loaded, only refused"}
    commit = hub.add_repo(REPO, pickled)

    with pytest.raises(CheckpointError) as e:
        fetch(tmp_path / "hf")
    assert str(e.value) == (
        f"{REPO} at {commit[:12]} has only pickle weights (pytorch_model.bin) "
        "(mathq loads safetensors only, never pickle; choose a revision or repo with "
        "*.safetensors)")
    assert transfers(hub) == []


def test_not_enough_disk_is_refused_before_the_transfer(hub, tmp_path):
    files = tiny_checkpoint()
    commit = hub.add_repo(REPO, files)
    hub.claim_size(SHARD2, 1 << 60)  # the listing says 1 EiB: no disk has that free

    with pytest.raises(DiskSpaceError) as e:
        fetch(tmp_path / "hf")
    assert e.value.message.startswith(
        f"not enough disk space for {REPO} at {commit[:12]}: needs 1048576.00 TiB, ")
    assert e.value.hint == "free some space, or write elsewhere"
    assert not any(p.startswith("/cdn/") for p in transfers(hub))


def test_token_is_sent_to_the_hub_only_and_never_shown(hub, tmp_path, monkeypatch):
    secret = "hf_sekritTokenThatMustNeverBePrinted"
    files = tiny_checkpoint()
    hub.add_repo(REPO, files, token=secret)

    with pytest.raises(DownloadError) as e:
        fetch(tmp_path / "a")
    assert str(e.value) == (f"repository {REPO} not found on {hub.url} (check hf_repo in the "
                            "recipe; for a private or gated repo, set HF_TOKEN to a read token)")

    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenAlsoSecret")
    result = CliRunner().invoke(cli, ["download", "deepseek-math-7b-rl"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {hub.url} refused access to {REPO} (HTTP 401) "
                                      "(check HF_TOKEN: the Hub refused it)")

    monkeypatch.setenv("HF_TOKEN", secret)
    hub.requests.clear()
    result = CliRunner().invoke(cli, ["download", "deepseek-math-7b-rl", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    to_hub = [r for r in hub.requests if not r.path.startswith("/cdn/")]
    to_cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert to_hub and all(r.headers.get("authorization") == f"Bearer {secret}" for r in to_hub)
    assert to_cdn and all("authorization" not in r.headers for r in to_cdn)


def test_unreachable_endpoint_names_hf_endpoint(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(DownloadError) as e:
        fetch(tmp_path / "hf", endpoint=endpoint)
    assert str(e.value) == (f"cannot connect to {endpoint} "
                            "(check your network, or HF_ENDPOINT if you use a mirror)")


def test_local_checkpoint_recipe_has_nothing_to_download(tmp_path):
    text = load_recipe("deepseek-math-7b-rl").path.read_text(encoding="utf-8")
    local = tmp_path / "local.toml"
    local.write_text(text.replace(f'hf_repo = "{REPO}"', 'local_dir = "ckpt"'), encoding="utf-8")
    with pytest.raises(RecipeError) as e:
        download_recipe(load_recipe(local))
    assert str(e.value) == (
        f"recipe deepseek-math-7b-rl has no hf_repo: its checkpoint is the local folder "
        f"{tmp_path / 'ckpt'} (there is nothing to download; convert reads that folder "
        "directly)")


def test_download_recipe_uses_the_build_folder(hub, tmp_path):
    files = tiny_checkpoint()
    commit = hub.add_repo(REPO, files)
    recipe = load_recipe("deepseek-math-7b-rl")
    result = download_recipe(recipe, build_root=tmp_path)
    layout = BuildLayout.for_model(recipe.name, tmp_path)
    assert result.dest == layout.hf_dir
    assert_same_files(layout.hf_dir, files)
    assert Manifest(layout.manifest).get("hf").inputs["commit"] == commit
    assert (layout.hf_dir / STATE_FILE).is_file()


# -- the command ------------------------------------------------------------------------------

def test_cli_download_happy_path(hub, tmp_path):
    files = tiny_checkpoint()
    commit = hub.add_repo(REPO, files)
    result = CliRunner().invoke(cli, ["download", "deepseek-math-7b-rl", "--build-dir",
                                      str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    hf = tmp_path / "deepseek-math-7b-rl" / "hf"
    total = sum(len(files[n]) for n in FETCHED)
    assert result.output == (f"{REPO} at {commit} in {hf}: 7 files, {format_bytes(total)} "
                             f"({format_bytes(total)} transferred)\n")
    assert_same_files(hf, files)

    other = tmp_path / "elsewhere"
    again = CliRunner().invoke(cli, ["download", "deepseek-math-7b-rl", "--build-dir",
                                     str(tmp_path), "--dir", str(other), "--json"],
                               catch_exceptions=False)
    data = json.loads(again.output)
    assert data["commit"] == commit and data["dest"] == str(other)
    assert [f["path"] for f in data["files"]] == list(FETCHED)
    manifest = Manifest(tmp_path / "deepseek-math-7b-rl" / "manifest.json")
    assert manifest.get(str(other.resolve())).inputs["commit"] == commit


def test_cli_download_main_error_is_one_line(hub):
    result = CliRunner().invoke(cli, ["download", "deepseek-math-7b-rl"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: repository {REPO} not found on {hub.url} (check hf_repo in the recipe; "
        "for a private or gated repo, set HF_TOKEN to a read token)"]


def test_cli_download_help_teaches():
    out = CliRunner().invoke(cli, ["download", "--help"]).output
    for needle in ("Hugging Face Hub", "--revision", "--dir", "HF_TOKEN", "HF_ENDPOINT",
                   "pickle", "resumes", "Examples:", "mathq download deepseek-math-7b-rl"):
        assert needle in out, needle


def test_build_dry_run_sizes_the_plan_from_the_hub_listing(hub, tmp_path):
    files = tiny_checkpoint()
    hub.add_repo(REPO, files)
    args = ["build", "deepseek-math-7b-rl", "--quant", "Q8_0", "--build-dir", str(tmp_path),
            "--dry-run", "--files-only"]
    plan = CliRunner().invoke(cli, args, catch_exceptions=False).output
    *steps, summary = plan.splitlines()
    assert summary.startswith(f"{len(steps)} of {len(steps)} steps would run")
    sizes = {line[10:32].strip(): line[33:45].strip() for line in steps}
    weights = len(files[SHARD1]) + len(files[SHARD2])
    total = sum(len(files[n]) for n in FETCHED)
    assert sizes["download"] == f"~{format_bytes(total)}"   # nothing fetched yet
    assert sizes["convert"] == f"~{format_bytes(weights)}"  # bf16 in, bf16 out
    assert sizes["quantize Q8_0"] != ""
    assert not (tmp_path / "deepseek-math-7b-rl" / "hf").exists()  # a plan fetches nothing
    # Offline there is no listing: the plan still prints, without sizes.
    offline = CliRunner(env={"HF_HUB_OFFLINE": "1"}).invoke(cli, args, catch_exceptions=False)
    first = offline.output.splitlines()[0]
    assert first.split()[:3] == ["would", "run", "download"] and first[33:45].strip() == ""
