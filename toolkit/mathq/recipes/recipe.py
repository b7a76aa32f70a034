"""Recipes: one TOML file per model, loaded into frozen dataclasses and validated.

A recipe says where a model comes from (Hugging Face repo and revision, or a local folder),
how to prompt it, which quantized variants to make, which Ollama tags to publish, how to
smoke-test it and which text KL divergence is measured on. Bundled recipes live in the
repository's ``recipes/`` folder (shipped inside the wheel as ``mathq/_recipes``); a user's
own TOML file can be given by path. Every error names the file and the field, and unknown
keys are refused so a typo never passes silently. Ollama's naming rules (:func:`name_problem`)
live here too: a recipe's tags must obey them.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.errors import RecipeError, shorten
from mathq.inputs import UnreadableInput, file_problem, finite, parse_toml, read_text
from mathq.recipes.prompt import COT_SUFFIXES as _COT_SUFFIX_TEXTS
from mathq.recipes.prompt import PROMPT_FORMATS, PromptSpec
from mathq.recipes.prompt import SYSTEM_PROMPT_POLICIES as SYSTEM_PROMPT_POLICIES
from mathq.recipes.quants import (
    TUNABLE_TYPES_HINT,
    UnknownQuantError,
    Variant,
    get_quant,
    parse_tune_list,
    parse_variant,
    parse_variant_list,
    tunable_type,
)

MODEL_KINDS = ("base", "chat")
# Prompt choices come from the prompt module, where their exact text is defined.
PROMPT_TEMPLATES = tuple(PROMPT_FORMATS)
COT_SUFFIXES = tuple(_COT_SUFFIX_TEXTS)


@dataclass(frozen=True)
class ModelSpec:
    """Where the checkpoint comes from and what it is."""

    name: str
    kind: str
    license_name: str
    license_url: str
    hf_repo: str | None = None
    revision: str = "main"
    local_dir: Path | None = None
    pre_tokenizer: str | None = None


@dataclass(frozen=True)
class QuantSpec:
    """Which variants a build makes, and which one is the default."""

    variants: tuple[str, ...]
    default: str


@dataclass(frozen=True)
class OllamaSpec:
    """The Ollama model name, its tags (tag -> quant type) and Modelfile parameters."""

    model: str
    tags: tuple[tuple[str, str], ...]
    parameters: tuple[tuple[str, Any], ...]

    def tag_map(self) -> dict[str, str]:
        """Tags in recipe order, each mapped to its quant type name."""
        return dict(self.tags)

    @property
    def num_ctx(self) -> int | None:
        """The context the Modelfiles set (``num_ctx``), or None when they set none: what
        bench states memory at and the model card runs llama.cpp with."""
        value = dict(self.parameters).get("num_ctx")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else None


@dataclass(frozen=True)
class SmokeSpec:
    """The default smoke test and the published figure it is compared with.

    ``suite`` is a suite name (``math500``) or an absolute path to a JSONL problem file
    (a recipe names it relative to itself).
    """

    suite: str
    n: int
    max_tokens: int
    reference_accuracy: float | None
    reference_source: str
    # What readers call a local problem file (the report and the model card); None: the
    # suite's own title (``MATH-500``) or the file's stem.
    suite_title: str | None = None


@dataclass(frozen=True)
class KldSpec:
    """The text ``mathq kld`` compares next-token distributions on.

    ``corpus`` None is mathq's bundled math notes (:mod:`mathq.datasets.corpus`), right for
    DeepSeek-Math; a recipe names its own UTF-8 file (relative to itself) with
    ``[kld] corpus = "..."`` when its model speaks another domain (the tiny demo's
    arithmetic word problems), since divergence on text a model never models well says
    little about the variants.
    """

    corpus: Path | None = None


@dataclass(frozen=True)
class TuneSpec:
    """How ``mathq tune`` and ``mathq build`` tune this model.

    ``calibration`` is the text the probes read, as ``mathq imatrix -c`` takes it (a set's
    name, or a file the recipe names relative to itself); None is mathq's default, MATH's
    training problems from the Hub. ``types`` are the candidate tensor types (None: the
    tuner's default). ``budgets`` are the tuned variants ``mathq build`` makes without
    ``--tune``: a type's (``Q2_K`` makes ``Q2_K-tuned``, the stock Q2_K file's size) or a
    bits-per-weight budget's (``T4.85``).
    """

    calibration: str | None = None
    types: tuple[str, ...] | None = None
    budgets: tuple[Variant, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """A whole recipe, with the file it came from."""

    path: Path
    model: ModelSpec
    prompt: PromptSpec
    quants: QuantSpec
    ollama: OllamaSpec
    smoke: SmokeSpec
    kld: KldSpec = KldSpec()
    tune: TuneSpec = TuneSpec()

    @property
    def name(self) -> str:
        """The model name, used for file names and the build folder."""
        return self.model.name

    def variant_names(self, quant_list: str | None = None) -> tuple[str, ...]:
        """The variants a command works on: ``quant_list`` (comma-separated names such as
        ``Q4_K_M,Q4_K_M-imat``, checked against llama.cpp's types) or, when it is not given
        (None), the recipe's own ``[quants] variants``; an empty list is refused."""
        if quant_list is not None:
            return tuple(v.name for v in parse_variant_list(quant_list))
        return tuple(self.quants.variants)


def bundled_recipes_dir() -> Path:
    """The folder of bundled recipes: in the wheel, or the repository checkout."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "_recipes"
    return packaged if packaged.is_dir() else package.parent.parent / "recipes"


def bundled_recipe_names() -> list[str]:
    """Names of the bundled recipes, sorted."""
    return sorted(p.stem for p in bundled_recipes_dir().glob("*.toml"))


def resolve_recipe_path(ref: str | Path) -> Path:
    """Turn a recipe name or a path into an existing TOML file, or raise RecipeError."""
    text = str(ref)
    as_path = Path(text).expanduser()
    if text.endswith(".toml") or "/" in text or os.path.lexists(as_path):
        problem = file_problem(as_path)
        if problem == "does not exist":
            raise RecipeError(f"recipe file {text} not found",
                              "give an existing .toml path or a name from `mathq recipes`",
                              path=text)
        if problem is not None:
            raise RecipeError(f"recipe {text} {problem}",
                              "give a .toml file or a name from `mathq recipes`", path=text)
        return as_path
    candidate = bundled_recipes_dir() / f"{text}.toml"
    if file_problem(candidate) is None:
        return candidate
    names = bundled_recipe_names()
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"did you mean {close[0]}?" if close else "run `mathq recipes` for the list"
    raise RecipeError(f"no recipe named {shorten(text)!r}", hint)


#: A recipe is a page of TOML; anything beyond a megabyte is not one.
RECIPE_LIMIT = 1 << 20


def load_recipe(ref: str | Path) -> Recipe:
    """Load and validate a recipe by bundled name or by path."""
    path = resolve_recipe_path(ref)
    try:
        data = parse_toml(read_text(path, RECIPE_LIMIT))
    except UnreadableInput as e:
        raise RecipeError(e.describe(path), "fix the recipe, or give another",
                          path=str(path)) from None
    return parse_recipe(data, path)


class _Table:
    """Typed, field-naming access to one TOML table, refusing keys nobody read."""

    def __init__(self, data: Any, path: Path, name: str) -> None:
        self.path, self.name = path, name
        if not isinstance(data, dict):
            self.fail(None, f"expected a table [{name}]")
        self.data: dict[str, Any] = data
        self.read: set[str] = set()

    def fail(self, key: str | None, problem: str, hint: str | None = None) -> None:
        field = f"{self.name}.{key}" if key else self.name
        raise RecipeError(f"{self.path}: [{field}] {problem}", hint or "fix the recipe",
                          path=str(self.path), field=field)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is ...:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"expected {kinds[0].__name__}, got a boolean")
        if not isinstance(value, kinds):
            self.fail(key, f"expected {kinds[0].__name__}, got {type(value).__name__}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = ...,
               whole: bool = True) -> Any:
        """A number from ``low`` to ``high`` (an integer when ``whole``): TOML's nan and inf
        never get here (the reader refuses them), and a count beyond any sensible bound would
        reach C code as an overflow or a loop that never ends."""
        value = self.get(key, int if whole else (float, int), default)
        if value is None and default is None:
            return None
        if not finite(value) or not low <= value <= high:
            kind = "a whole number" if whole else "a number"
            self.fail(key, f"must be {kind} from {low} to {high}, got "
                           f"{shorten(repr(value), 40)}")
        return value

    def resolve(self, key: str, path: Path) -> Path:
        """``path`` made absolute with links resolved, or the field named: a loop of
        links is a RuntimeError in Python's resolve(), not an OSError."""
        try:
            return path.resolve()
        except (RuntimeError, OSError):
            self.fail(key, f"names {path}, which is a loop of symbolic links")
            raise AssertionError("unreachable") from None

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def quant(self, key: str, value: str) -> str:
        try:
            return get_quant(value).name
        except UnknownQuantError as e:
            self.fail(key, e.message, e.hint)
            raise AssertionError("unreachable") from e

    def variant(self, key: str, value: str) -> str:
        """A variant name (``Q4_K_M``, ``Q4_K_M-imat``, ``Q2_K-tuned``) in its canonical
        spelling, or the field's error."""
        try:
            return parse_variant(value).name
        except UnknownQuantError as e:
            self.fail(key, e.message, e.hint)
            raise AssertionError("unreachable") from e

    def finish(self) -> None:
        extra = sorted(set(self.data) - self.read)
        if extra:
            self.fail(extra[0], "is not a recipe field",
                      "check the spelling against `mathq recipes show deepseek-math-7b-rl`")


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    """Validate parsed TOML ``data`` from ``path`` into a :class:`Recipe`."""
    top = _Table(data, path, "recipe")
    model = _parse_model(_Table(top.get("model", dict), path, "model"))
    prompt = _parse_prompt(_Table(top.get("prompt", dict), path, "prompt"), model.kind)
    quants = _parse_quants(_Table(top.get("quants", dict), path, "quants"))
    ollama = _parse_ollama(_Table(top.get("ollama", dict), path, "ollama"), quants)
    smoke = _parse_smoke(_Table(top.get("smoke", dict), path, "smoke"))
    kld = _parse_kld(_Table(top.get("kld", dict, {}), path, "kld"))
    tune = _parse_tune(_Table(top.get("tune", dict, {}), path, "tune"))
    top.finish()
    return Recipe(path=path, model=model, prompt=prompt, quants=quants, ollama=ollama,
                  smoke=smoke, kld=kld, tune=tune)


def _parse_tune(t: _Table) -> TuneSpec:
    calibration = t.get("calibration", str, None)
    if calibration is not None and not calibration.strip():
        t.fail("calibration", "is empty",
               "name a set such as math-train or a file relative to the recipe, or leave "
               "calibration out")
    # A set's name is checked where the sets are known (the tune stage, when a tune is
    # planned); a file is checked here.
    if calibration is not None and calibration.endswith((".jsonl", ".txt", ".md")):
        path = t.resolve("calibration", t.path.parent / calibration)
        if (problem := file_problem(path)) is not None:
            t.fail("calibration", f"{path} {problem}",
                   "name a problem file (.jsonl) or a text file relative to the recipe, or "
                   "leave calibration out for MATH's training problems")
        calibration = str(path)
    types = None
    if (given := t.get("types", list, None)) is not None:
        names = []
        for i, v in enumerate(given):
            if (name := tunable_type(v)) is None:
                t.fail(f"types[{i}]", f"{shorten(repr(v), 40)} is not a tensor type the tuner "
                       "can choose", TUNABLE_TYPES_HINT)
                raise AssertionError("unreachable")
            names.append(name)
        if not names:
            t.fail("types", "names no type", "leave it out for the tuner's default types")
        types = tuple(dict.fromkeys(names))
    budgets: dict[str, Variant] = {}
    for i, v in enumerate(t.get("budgets", list, [])):
        if not isinstance(v, str) or "," in v:
            t.fail(f"budgets[{i}]", "expected one type or budget name",
                   "e.g. budgets = [\"Q2_K\", \"T4.85\"]")
        try:
            (variant,) = parse_tune_list(v)
        except UnknownQuantError as e:
            t.fail(f"budgets[{i}]", e.message, e.hint)
            raise AssertionError("unreachable") from e
        budgets.setdefault(variant.name, variant)
    t.finish()
    return TuneSpec(calibration=calibration, types=types, budgets=tuple(budgets.values()))


def _parse_kld(t: _Table) -> KldSpec:
    corpus = t.get("corpus", str, None)
    path = None
    if corpus is not None:
        path = t.resolve("corpus", t.path.parent / corpus)
        if (problem := file_problem(path)) is not None:
            t.fail("corpus", f"{path} {problem}",
                   "name a UTF-8 text file relative to the recipe, or leave corpus out for "
                   "mathq's bundled math notes")
    t.finish()
    return KldSpec(corpus=path)


def _parse_model(t: _Table) -> ModelSpec:
    name = t.get("name", str)
    if problem := name_problem(name, "model name"):
        t.fail("name", problem)
    hf_repo = t.get("hf_repo", str, None)
    local = t.get("local_dir", str, None)
    if (hf_repo is None) == (local is None):
        t.fail("hf_repo", "give exactly one of hf_repo (a Hub repo id) or local_dir (a folder)")
    if hf_repo is not None and hf_repo.count("/") != 1:
        t.fail("hf_repo", f"expected 'owner/name', got {hf_repo!r}")
    local_dir = t.resolve("local_dir", t.path.parent / local) if local is not None else None
    spec = ModelSpec(
        name=name,
        kind=t.choice("kind", MODEL_KINDS),
        license_name=t.get("license_name", str),
        license_url=t.get("license_url", str),
        hf_repo=hf_repo,
        revision=t.get("revision", str, "main"),
        local_dir=local_dir,
        pre_tokenizer=t.get("pre_tokenizer", str, None),
    )
    t.finish()
    return spec


def _parse_prompt(t: _Table, kind: str) -> PromptSpec:
    spec = PromptSpec(
        template=t.choice("template", PROMPT_TEMPLATES),
        cot_suffix=t.choice("cot_suffix", COT_SUFFIXES, "en"),
        append_cot_suffix=t.get("append_cot_suffix", bool, kind == "chat"),
        system_prompt=t.choice("system_prompt", SYSTEM_PROMPT_POLICIES, "none"),
        few_shot=t.number("few_shot", 0, 64, 0),
    )
    if spec.few_shot < 0:
        t.fail("few_shot", "must be 0 or more")
    if spec.template == "few-shot" and spec.few_shot == 0:
        t.fail("few_shot", "the few-shot template needs few_shot > 0 (MATH uses 4)")
    t.finish()
    return spec


def _parse_quants(t: _Table) -> QuantSpec:
    variants = t.get("variants", list)
    if not variants:
        t.fail("variants", "must list at least one quantization type")
    names = []
    for i, v in enumerate(variants):
        if not isinstance(v, str):
            t.fail(f"variants[{i}]", f"expected a string, got {type(v).__name__}")
        names.append(t.quant(f"variants[{i}]", v))
    default = t.quant("default", t.get("default", str, "Q4_K_M"))
    t.finish()
    return QuantSpec(variants=tuple(dict.fromkeys(names)), default=default)


def _parse_ollama(t: _Table, quants: QuantSpec) -> OllamaSpec:
    model = t.get("model", str)
    if problem := name_problem(model, "model name"):
        t.fail("model", problem)
    tags = _Table(t.get("tags", dict), t.path, "ollama.tags")
    tag_pairs = []
    for tag, quant in tags.data.items():
        tags.read.add(tag)
        if problem := name_problem(tag, "tag"):
            tags.fail(tag, problem)
        if not isinstance(quant, str):
            tags.fail(tag, f"expected a quant type name, got {type(quant).__name__}")
        tag_pairs.append((tag, tags.variant(tag, quant)))
    if not tag_pairs:
        tags.fail(None, "must map at least one tag to a quant type, e.g. latest = \"Q4_K_M\"")
    params = t.get("parameters", dict, {})
    for key, value in params.items():
        ok = isinstance(value, (str, int, float)) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok:
            t.fail(f"parameters.{key}", "expected a number, string, boolean or list of strings")
    t.finish()
    return OllamaSpec(model=model, tags=tuple(tag_pairs), parameters=tuple(params.items()))


def _parse_smoke(t: _Table) -> SmokeSpec:
    suite = t.get("suite", str, "math500")
    if suite.endswith(".jsonl"):  # a local problem file, relative to the recipe
        suite = str(t.resolve("suite", t.path.parent / suite))
    spec = SmokeSpec(
        suite=suite,
        n=t.number("n", 1, 10_000_000, 100),
        max_tokens=t.number("max_tokens", 1, 1 << 20, 1024),
        reference_accuracy=t.get("reference_accuracy", (float, int), None),
        reference_source=t.get("reference_source", str, ""),
        suite_title=t.get("suite_title", str, None),
    )
    if spec.reference_accuracy is not None and not (finite(spec.reference_accuracy)
                                                    and 0 <= spec.reference_accuracy <= 100):
        t.fail("reference_accuracy", "is a percentage between 0 and 100")
    if spec.suite_title is not None and not 0 < len(spec.suite_title.strip()) <= 80:
        t.fail("suite_title", "must be 1-80 characters, e.g. \"MATH-500\"")
    t.finish()
    return spec


_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


def name_problem(value: str, what: str = "tag") -> str | None:
    """Why ``value`` is not a valid Ollama ``what`` (tag, model, namespace), or None if it is."""
    if _PART.fullmatch(value):
        return None
    if not value:
        return f"empty {what}"
    if len(value) > 80:
        return f"{what} {value!r} is {len(value)} characters; Ollama allows at most 80"
    if not re.match(r"[A-Za-z0-9_]", value):
        return f"{what} {value!r} must start with a letter, digit or '_'"
    bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9_.-]", c)})
    return f"{what} {value!r} contains {''.join(bad)!r}; use only letters, digits, '_', '.', '-'"
