"""``mathq publish --hf-repo`` with the real huggingface_hub client against the fake Hub.

The fake Hub (tests/hubserver.py) speaks the upload endpoints huggingface_hub's legacy LFS
path uses (create repo, YAML validation, preupload, LFS batch + PUT + verify, commit); Xet is
switched off through huggingface_hub's own constant. The GGUFs are real llama.cpp outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mathq.evaluate.summaries import KldSummary, Rate, SmokeSummary, save_summary
from mathq.layout import BuildLayout
from mathq.publish.model_card import EXAMPLE_QUESTION
from mathq.recipes.prompt import render_prompt
from mathq.recipes.recipe import load_recipe
from tests.clirun import run
from tests.hubserver import FakeHub
from tests.ollamaserver import FakeOllama
from tests.publishkit import build_folder, write_recipe

TOKEN = "hf_test_write_token"
REPO = "me/tiny-GGUF"
FILES = ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "Q4_K_M.Modelfile", "Q8_0.Modelfile",
         "README.md"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # hf_xet would bypass LFS
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with FakeHub() as fake:
        fake.add_writer(TOKEN, "me")
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


@pytest.fixture
def setup(tmp_path: Path, tiny_quantized: dict[str, Path]):
    return write_recipe(tmp_path), build_folder(tmp_path / "build", tiny_quantized)


def publish(recipe: Path, root: Path, *args: str, code: int = 0):
    return run("publish", str(recipe), "--build-dir", str(root), *args, code=code)


def writes(hub: FakeHub) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in hub.requests if r.method in ("POST", "PUT")
            and "validate-yaml" not in r.path]


def test_upload_creates_a_private_repo_with_files_modelfiles_and_card(
        hub, setup, tiny_quantized, monkeypatch):
    recipe, root = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = publish(recipe, root, "--hf-repo", REPO, "--private").output
    head = hub.head(REPO)
    assert out.splitlines() == [f"{hub.url}/{REPO}: commit {head[:12]} with 5 file(s) "
                                f"({', '.join(FILES)}); 0 unchanged"]
    files = hub.files(REPO)
    assert sorted(files) == sorted([".gitattributes", *FILES])
    assert files["tiny-Q4_K_M.gguf"] == tiny_quantized["Q4_K_M"].read_bytes()
    assert files["tiny-Q8_0.gguf"] == tiny_quantized["Q8_0"].read_bytes()
    assert hub.is_private(REPO)
    # Each GGUF crossed the wire once, as a PUT to storage; the commit only names it.
    puts = [p for m, p in writes(hub) if m == "PUT"]
    assert sorted(puts) == sorted(
        f"/lfs-upload/{hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in tiny_quantized.values())
    modelfile = files["Q8_0.Modelfile"].decode()
    assert "\nFROM ./tiny-Q8_0.gguf\n" in modelfile and "# Ollama tag tiny:q8," in modelfile
    card = files["README.md"].decode()
    assert hub.validated_yaml == [card]
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "deepseek-ai/deepseek-math-7b-rl"
    assert meta["license"] == "other" and meta["license_name"] == "deepseek-license"
    assert "gguf" in meta["tags"] and meta["pipeline_tag"] == "text-generation"


def test_rerun_sends_nothing_and_a_changed_card_is_the_only_new_file(
        hub, setup, monkeypatch):
    recipe, root = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish(recipe, root, "--hf-repo", REPO)
    first = hub.head(REPO)
    before = len(writes(hub))
    out = publish(recipe, root, "--hf-repo", REPO).output
    assert out.splitlines() == [f"{hub.url}/{REPO}: all 5 files unchanged, no commit"]
    assert writes(hub)[before:] == [("POST", "/api/repos/create")]  # answered 409
    assert hub.head(REPO) == first
    # A smoke result for Q4_K_M changes only the card.
    save_summary(BuildLayout.for_model("tiny", root).smoke_summary("Q4_K_M"), smoke("Q4_K_M"))
    before = len(writes(hub))
    out = publish(recipe, root, "--hf-repo", REPO).output
    assert "with 1 file(s) (README.md); 4 unchanged" in out
    assert not [w for w in writes(hub)[before:] if w[0] == "PUT"]
    assert "| 60.0 [38.7, 78.1] |" in hub.files(REPO)["README.md"].decode()


def test_without_a_token_the_upload_is_refused_with_the_fix(hub, setup):
    recipe, root = setup
    result = publish(recipe, root, "--hf-repo", REPO, code=1)
    assert result.output.splitlines() == [
        f"Error: {hub.url} refused to let mathq write to {REPO} (HTTP 401: not logged in) "
        "(set HF_TOKEN to a write token from https://huggingface.co/settings/tokens)"]


def test_another_users_namespace_is_refused(hub, setup, monkeypatch):
    recipe, root = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = publish(recipe, root, "--hf-repo", "someone/tiny", code=1)
    assert result.output.splitlines() == [
        f"Error: {hub.url} refused to let mathq write to someone/tiny (HTTP 403) (use a write "
        "token of someone, or of a member of that organisation with write access)"]


@pytest.mark.parametrize(("repo", "line"), [
    ("tiny", "Error: Hub repo 'tiny' is not of the form owner/name (pass --hf-repo USER/NAME "
             "(your user or an organisation))"),
    ("me/a--b", "Error: Hub repo 'me/a--b' is not a valid repo id (use letters, digits, '-', "
                "'_', '.' (no '--' or '..'), at most 96 characters)"),
])
def test_bad_repo_ids_are_refused_before_any_request(hub, setup, repo, line):
    recipe, root = setup
    result = publish(recipe, root, "--hf-repo", repo, code=2)
    assert result.output.splitlines() == [line]
    assert hub.requests == []


def test_dry_run_to_both_destinations_sends_nothing(hub, setup, monkeypatch):
    recipe, root = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeOllama() as ollama:
        out = publish(recipe, root, "--hf-repo", REPO, "--namespace", "me",
                      "--ollama-host", ollama.url, "--dry-run").output
        plan = json.loads(publish(recipe, root, "--hf-repo", REPO, "--namespace", "me",
                                  "--ollama-host", ollama.url, "--dry-run", "--json").output)
        assert ollama.requests == []
    assert hub.requests == []
    assert plan["dry_run"] and [t["name"] for t in plan["ollama"]["tags"]] == [
        "me/tiny:latest", "me/tiny:q8", "me/tiny:q4"]
    assert [f["path_in_repo"] for f in plan["hub"]["files"]] == FILES
    assert f"Hugging Face repo {REPO} (public) at {hub.url}" in out
    for name in FILES:
        assert f"  upload {name}  " in out
    assert "--- README.md ---\n---\n" in out
    assert "ollama run me/tiny:latest" in out  # the card names the pushed tags


def smoke(quant: str) -> SmokeSummary:
    return SmokeSummary(
        model="tiny", quant=quant, gguf=f"tiny-{quant}.gguf", suite="math500",
        suite_source="HuggingFaceH4/MATH-500", backend="llama.cpp", parallel=1,
        max_tokens=512, accuracy=Rate(12, 20, 0.6, 0.3866, 0.7812), by_subject={},
        by_level={}, prompt_tokens=1000, completion_tokens=5000,
        generation_tokens_per_second=20.0, wall_seconds=100.0, reference_accuracy=51.7,
        reference_source="DeepSeekMath paper")


def kld(quant: str) -> KldSummary:
    return KldSummary(model="tiny", quant=quant, reference="tiny-BF16.gguf",
                      corpus="wikitext-2 test", n_tokens=8192, mean_kld=0.01234,
                      mean_kld_err=0.00056, kld_percentiles={"99": 0.1},
                      same_top=Rate(7900, 8192, 0.9644, 0.96, 0.968), rms_delta_p=0.02)


def test_model_card_reports_measurements_prompt_and_how_to_run(setup):
    from mathq.publish.model_card import card_files, render_model_card
    from mathq.publish.plan import release_report, tag_files

    recipe_path, root = setup
    recipe = load_recipe(recipe_path)
    layout = BuildLayout.for_model("tiny", root)
    save_summary(layout.smoke_summary("Q4_K_M"), smoke("Q4_K_M"))
    save_summary(layout.kld_summary("Q4_K_M"), kld("Q4_K_M"))
    _pairs, files = tag_files(recipe, build_root=root)
    data = release_report(recipe, root)
    rows = card_files(data, list(files.values()), {"Q4_K_M": "Q4_K_M.Modelfile",
                                                   "Q8_0": "Q8_0.Modelfile"})
    card = render_model_card(recipe, REPO, data, rows, namespace="me", build_root=root)
    q4, q8 = files["Q4_K_M"], files["Q8_0"]
    lines = card.splitlines()
    # Largest first; BF16 was not smoke-tested, so there is no baseline row and no pick.
    table = [line for line in lines if line.startswith("| [tiny-")]
    assert table == [
        f"| [tiny-Q8_0.gguf](./tiny-Q8_0.gguf) | {_size(q8.size)} | "
        f"{q8.bits_per_weight:.2f} | — | — | — | — | not measured | `q8` |",
        f"| [tiny-Q4_K_M.gguf](./tiny-Q4_K_M.gguf) | {_size(q4.size)} | "
        f"{q4.bits_per_weight:.2f} | 60.0 [38.7, 78.1] | — | 0.0123 ± 0.0006 | 96.4 | "
        "no baseline | `latest`, `q4` |"]
    assert 7.5 < q8.bits_per_weight < 9.5  # measured from the file, not the nominal 8.5
    assert ("No file of this repo is recommended: Q8_0 was not smoke-tested on BF16's "
            "problems; Q4_K_M has no BF16 baseline (BF16 was not smoke-tested).") in card
    assert "Memory was not measured for these files" in card
    assert "A dash means not measured for this release." in card
    # The prompt block is the prompt module's text; the CoT suffix is spelled out.
    assert f"```text\n{render_prompt(recipe.prompt, '{question}')}\n```" in card
    assert ("new line: `Please reason step by step, and put your final answer within "
            "\\boxed{}.`") in card
    # With no pick, the how-to names the largest file.
    assert f"hf download {REPO} tiny-Q8_0.gguf Q8_0.Modelfile --local-dir ." in card
    assert "ollama create tiny:q8 -f Q8_0.Modelfile" in card
    assert "ollama run me/tiny:q8" in card and "ollama run me/tiny:latest" in card
    # The llama.cpp command line, read by bash, passes exactly the prompt the model expects.
    cmd = next(line for line in lines if line.startswith("  -p $'"))
    printed = subprocess.run(["bash", "-c", f"printf %s {cmd.split('-p ', 1)[1]}"],
                             capture_output=True, text=True, check=True).stdout
    assert printed == render_prompt(recipe.prompt, EXAMPLE_QUESTION)


def _size(n: int) -> str:
    from mathq.fsutil import format_bytes

    return format_bytes(n)


# --- the card of the demo build ------------------------------------------------------------

DEMO_REPO = "me/tiny-demo-GGUF"


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make demo`'s build (the bundled model, its 400 problems, Q2_K, Q4_K_M, Q8_0)."""
    root = tmp_path_factory.mktemp("demo-build")
    run("build", "tiny-demo", "--quant", "Q2_K,Q4_K_M,Q8_0", "--build-dir", str(root))
    return root


def test_demo_card_carries_the_reports_decision_sized_for_memory(hub, demo_build, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run("publish", "tiny-demo", "--build-dir", str(demo_build), "--hf-repo", DEMO_REPO)
    files = hub.files(DEMO_REPO)
    card = files["README.md"].decode()
    report = json.loads((demo_build / "tiny-demo" / "report" / "report.json").read_text())
    pick = report["advice"]["quant"]
    assert pick == "Q4_K_M"  # the demo's 2-bit file loses accuracy; 4-bit is the pick
    rows = {r["quant"]: r for r in report["rows"]}

    # The files table: BF16's baseline row, then the repo's files largest first.
    section = card.split("## Files\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert section[0].startswith("| File | Size | Bits/weight | MATH % [95 % CI] | "
                                 "Δ vs BF16 (pp) [95 % CI], p | Mean KLD | Same top % | "
                                 "Memory at 512 tokens | Advice |")
    names = [line.split(" | ")[0] for line in section[2:]]
    assert names == ["| BF16 (baseline, not in this repo)",
                     "| [tiny-demo-Q8_0.gguf](./tiny-demo-Q8_0.gguf)",
                     "| [tiny-demo-Q4_K_M.gguf](./tiny-demo-Q4_K_M.gguf)",
                     "| [tiny-demo-Q2_K.gguf](./tiny-demo-Q2_K.gguf)"]
    cells = {n: line.split(" | ") for n, line in zip(("BF16", "Q8_0", "Q4_K_M", "Q2_K"),
                                                      section[2:], strict=True)}
    assert cells["BF16"][4] == "baseline" and cells["BF16"][5] == "0 (reference)"
    assert cells["Q4_K_M"][-2] == "★ 4-bit pick" and cells["Q8_0"][-2] == "★ 8-bit pick"
    assert cells["Q2_K"][-2] == "loses accuracy" and "p < 0.001" in cells["Q2_K"][4]
    q4 = rows["Q4_K_M"]
    assert cells["Q4_K_M"][3] == (f"{100 * q4['accuracy']['value']:.1f} "
                                  f"[{100 * q4['accuracy']['low']:.1f}, "
                                  f"{100 * q4['accuracy']['high']:.1f}]")
    assert cells["Q4_K_M"][6] == f"{100 * q4['same_top']['value']:.1f}"
    # Memory: llama.cpp's buffers as bench measured them at the recipe's num_ctx (512).
    bench = json.loads((demo_build / "tiny-demo" / "bench" / "Q4_K_M.json").read_text())
    buffers = bench["buffers_by_context"]["512"]
    assert cells["Q4_K_M"][7] == _size(sum(buffers.values()))

    # Which file: the report's pick with its why, every class, and the budget table.
    which = card.split("## Which file should I use?\n\n", 1)[1].split("## Files", 1)[0]
    assert which.startswith("**Recommended: `tiny-demo-Q4_K_M.gguf`** (4-bit pick). Q4_K_M (")
    [picked] = [p for p in report["advice"]["picks"] if p["quant"] == "Q4_K_M"]
    assert picked["reason"] in which
    assert "- **2-bit**: No 2-bit pick: Q2_K loses accuracy" in which
    assert "- **8-bit**: Q8_0 (" in which
    # Every budget holds the whole demo model, so the file closest to BF16 is the answer.
    assert "| from 4 GB | Q8_0 | " in which
    assert "400" in card and "distractor word problems" in card
    assert "problems-distractor" not in card  # the suite's title, not its file's stem

    # The how-to downloads the recommended file.
    assert f"hf download {DEMO_REPO} tiny-demo-Q4_K_M.gguf Q4_K_M.Modelfile" in card
    # Nothing of this machine's folders in anything uploaded, GGUFs included.
    machine = {str(demo_build), str(Path(__file__).resolve().parents[1]), str(Path.home()),
               str(demo_build.resolve())}
    for name, data in files.items():
        for folder in machine:
            assert folder.encode() not in data, (name, folder)


def test_ollama_output_marks_the_reports_pick(demo_build):
    out = run("publish", "tiny-demo", "--build-dir", str(demo_build), "--namespace", "me",
              "--dry-run").output
    marked = [line.split()[1] for line in out.splitlines() if line.endswith("★ recommended")]
    assert marked == ["me/mathq-tiny-demo:q4_K_M"]
    assert "Recommended: me/mathq-tiny-demo:q4_K_M, the report's 4-bit pick: Q4_K_M (" in out
    plan = json.loads(run("publish", "tiny-demo", "--build-dir", str(demo_build),
                          "--namespace", "me", "--dry-run", "--json").output)
    assert [t["tag"] for t in plan["ollama"]["tags"] if t["recommended"]] == ["q4_K_M"]


def test_imatrix_and_tuned_variants_are_published_and_explained(
        hub, tmp_path, tiny_quant_ggufs, monkeypatch):
    """A recipe's tags may name -imat and -tuned variants: publish checks their type, uploads
    a tuned file's overrides beside it, the card says what each is, and neither the matrix's
    nor the calibration text's folder goes into anything uploaded."""
    import numpy as np

    from mathq.convert.gguf_info import read_gguf_summary
    from mathq.quantize.core import QuantizeOptions, quantize_gguf
    from mathq.quantize.imatrix_file import write_imatrix_gguf
    from mathq.recipes.quants import get_quant

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    secret = tmp_path / "private-folder"
    secret.mkdir()
    bf16 = tiny_quant_ggufs["BF16"]
    widths = {t.name: int(t.shape[0]) for t in read_gguf_summary(bf16).tensors
              if len(t.shape) == 2 and t.name != "token_embd.weight"}
    matrix = secret / "math.imatrix.gguf"
    write_imatrix_gguf(matrix, {n: np.ones(w, np.float32) for n, w in widths.items()},
                       {n: np.array([1.0]) for n in widths}, ("../private-folder/calib.jsonl",),
                       1, 32)
    recipe = write_recipe(tmp_path)
    text = recipe.read_text().replace('q4 = "Q4_K_M"\n',
                                      'q4i = "Q4_K_M-imat"\nq2t = "Q2_K-tuned"\n')
    recipe.write_text(text)
    root = build_folder(tmp_path / "build", {"Q4_K_M": tiny_quant_ggufs["Q4_K_M"],
                                             "Q8_0": tiny_quant_ggufs["Q8_0"]})
    folder = root / "tiny"
    quantize_gguf(bf16, folder / "tiny-Q4_K_M-imat.gguf",
                  QuantizeOptions(get_quant("Q4_K_M"), imatrix=matrix))
    overrides = folder / "tiny-Q2_K-tuned.overrides.txt"
    overrides.write_text("blk\\.0\\.ffn_down\\.weight=q4_k\n")
    quantize_gguf(bf16, folder / "tiny-Q2_K-tuned.gguf", QuantizeOptions(
        get_quant("Q2_K"), overrides=((r"blk\.0\.ffn_down\.weight", "q4_k"),),
        metadata=(("quantize.tuned.calibration", f"calibration: {secret}/train.jsonl"),
                  ("quantize.tuned.overrides_sha256",
                   hashlib.sha256(overrides.read_bytes()).hexdigest()))))
    run("publish", str(recipe), "--build-dir", str(root), "--hf-repo", REPO)
    files = hub.files(REPO)
    assert files["tiny-Q2_K-tuned.overrides.txt"] == overrides.read_bytes()
    assert {"Q4_K_M-imat.Modelfile", "Q2_K-tuned.Modelfile"} <= set(files)
    card = files["README.md"].decode()
    assert ("- `tiny-Q2_K-tuned.gguf`: tuned: each tensor's type chosen by `mathq tune` for the "
            "lowest KL divergence from BF16 within the size of llama.cpp's Q2_K mix, calibrated "
            "on train.jsonl") in card
    assert "`tiny-Q2_K-tuned.overrides.txt` beside it reproduces it" in card
    assert ("- `tiny-Q4_K_M-imat.gguf`: quantized with an importance matrix "
            "`math.imatrix.gguf`, computed on calib.jsonl: ") in card
    for name, data in files.items():
        assert str(secret).encode() not in data, name
        assert str(tmp_path).encode() not in data, name
        assert b"private-folder" not in data, name  # not even a relative path's folder
    # An overrides file that is not the one the tuned file was made with is refused.
    overrides.write_text("blk\\.0\\.ffn_down\\.weight=q8_0\n")
    out = run("publish", str(recipe), "--build-dir", str(root), "--hf-repo", REPO, "--dry-run",
              code=1).output
    assert out.startswith(f"Error: {overrides} is not the overrides file tiny-Q2_K-tuned.gguf "
                          "was made with")


def test_figures_of_an_earlier_file_are_never_published(demo_build):
    """A variant rebuilt (or replaced) after it was measured is refused before any hashing."""
    import os

    gguf = demo_build / "tiny-demo" / "tiny-demo-Q4_K_M.gguf"
    before = gguf.stat()
    os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        out = run("publish", "tiny-demo", "--build-dir", str(demo_build), "--namespace", "me",
                  "--dry-run", code=1).output
    finally:
        os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert out.startswith("Error: tiny-demo-Q4_K_M.gguf changed after its smoke figures were "
                          "measured (measure it again")
    # `--tag ,` names no tag: refused, rather than read as "every tag".
    empty = run("publish", "tiny-demo", "--build-dir", str(demo_build), "--namespace", "me",
                "--tag", ",", "--dry-run", code=2).output
    assert empty.splitlines()[-1].endswith(
        "no tag given; name one or more of the recipe's tags, e.g. --tag latest")


def test_a_num_ctx_beyond_the_trained_context_is_said(setup):
    from mathq.publish.model_card import card_files, render_model_card
    from mathq.publish.plan import release_report, tag_files

    recipe_path, root = setup
    recipe_path.write_text(recipe_path.read_text().replace(
        "num_predict = 512\n", "num_predict = 512\nnum_ctx = 100000\n"))
    recipe = load_recipe(recipe_path)
    _pairs, files = tag_files(recipe, build_root=root)
    data = release_report(recipe, root)
    rows = card_files(data, list(files.values()), {q: f"{q}.Modelfile" for q in files})
    card = render_model_card(recipe, REPO, data, rows, build_root=root)
    assert ("The Modelfiles set num_ctx 100,000, beyond the 512 tokens the model was trained "
            "on") in card
    assert "-c 100000" in card  # the llama.cpp line runs it as the Modelfiles do
