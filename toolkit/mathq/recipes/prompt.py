"""DeepSeek-Math's prompts, defined once: prompt strings, Ollama templates and stop lists.

A recipe's ``[prompt]`` table names a format (``deepseek-chat`` or ``few-shot``), a
chain-of-thought suffix, whether user turns get it, and whether system messages count.
This module turns that into exact text: :func:`render_prompt` for one question (what the
smoke test feeds llama.cpp), :func:`render_chat` for a conversation, :func:`stop_strings`
for the decoder, and :mod:`mathq.modelfile.gotemplate` writes the same rules as an Ollama template.
Tests prove all three agree with DeepSeek's Hugging Face chat template byte for byte.

BOS never appears here: the tokenizer adds it (``add_bos_token`` is true for this model),
so a prompt that carried it would start with two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mathq.errors import RecipeError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

CONTEXT_LENGTH = 4096
"""Tokens DeepSeek-Math was trained with: the Modelfile's ``num_ctx`` unless the recipe sets it."""


@dataclass(frozen=True)
class PromptSpec:
    """How the model is prompted; the functions below turn it into exact strings.

    Defined here, beside the formats it names, so that the recipe schema imports the prompt
    and never the other way round.
    """

    template: str
    cot_suffix: str
    append_cot_suffix: bool
    system_prompt: str
    few_shot: int


COT_SUFFIXES: dict[str, str] = {
    # DeepSeek's evaluation (run_subset_parallel.py, markup_question) appends these to each
    # question; the Chinese one uses a full-width comma, exactly as DeepSeek wrote it.
    "en": "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "zh": "\n请通过逐步推理来解答问题，并把最终答案放置于\\boxed{}中。",
    "none": "",
}

SYSTEM_PROMPT_POLICIES = ("none", "allow")
"""``none``: system messages are dropped (DeepSeek advises against them); ``allow``: they are
rendered where they stand, as DeepSeek's chat template does."""

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, as an Ollama or OpenAI client sends it."""

    role: str
    content: str


@dataclass(frozen=True)
class Exemplar:
    """One solved problem of a few-shot prompt."""

    problem: str
    solution: str
    answer: str


@dataclass(frozen=True)
class PromptFormat:
    """How one recipe ``template`` id lays out a conversation."""

    id: str
    description: str
    stop: tuple[str, ...]
    stop_reason: str


# The four MATH exemplars of Minerva (Lewkowycz et al. 2022), exactly as DeepSeek's
# evaluation uses them for the base model (evaluation/few_shot_prompts/
# cot_minerva_math_4_shot.py), including the stray "}" after the first problem.
MINERVA_MATH_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        problem=r"Find the domain of the expression $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
        solution=(
            "The expressions inside each square root must be non-negative.\n"
            r"Therefore, $x-2 \ge 0$, so $x\ge2$, and $5 - x \ge 0$, so $x \le 5$." "\n"
            "Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$.\n"
            r"Therefore, the domain of the expression is $\boxed{[2,5)}$."
        ),
        answer="[2,5)",
    ),
    Exemplar(
        problem=(r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find "
                 r"$\det (\mathbf{A} \mathbf{B}).$"),
        solution=(r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})"
                  r"(\det \mathbf{B}) = (2)(12) = \boxed{24}.$"),
        answer="24",
    ),
    Exemplar(
        problem=("Terrell usually lifts two 20-pound weights 12 times. If he uses two "
                 "15-pound weights instead, how many times must Terrell lift them in order "
                 "to lift the same total weight?"),
        solution=(
            r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of "
            r"$2\cdot 12\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights "
            r"instead for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ pounds of "
            r"weight.  Equating this to 480 pounds, we can solve for $n$: \begin{align*}" "\n"
            r"30n&=480\\" "\n"
            r"\Rightarrow\qquad n&=480/30=\boxed{16}" "\n"
            r"\end{align*}"
        ),
        answer="16",
    ),
    Exemplar(
        problem=(
            "If the system of equations\n\n"
            r"\begin{align*}" "\n"
            r"6x-4y&=a,\\" "\n"
            "6y-9x &=b.\n"
            r"\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero, find "
            r"$\frac{a}{b},$ assuming $b$ is nonzero."
        ),
        solution=(
            r"If we multiply the first equation by $-\frac{3}{2}$, we obtain" "\n\n"
            r"$$6y-9x=-\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have" "\n\n"
            r"$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$"
        ),
        answer=r"-\frac{2}{3}",
    ),
)

PROMPT_FORMATS: dict[str, PromptFormat] = {
    "deepseek-chat": PromptFormat(
        id="deepseek-chat",
        description=("DeepSeek's chat template: User: {message}\\n\\nAssistant: {reply}"
                     f"{EOS}User: ...\\n\\nAssistant:"),
        # EOS is how the chat models end a reply. "User:" is what a reply that skipped EOS
        # (a heavily quantized model can) runs into: the next turn of the trained format.
        # It never appears at the start of a MATH solution line in DeepSeek's outputs, so
        # it only cuts a reply that has already ended.
        stop=(EOS, "User:"),
        stop_reason="EOS ends a reply; 'User:' ends a reply that ran past a missed EOS",
    ),
    "few-shot": PromptFormat(
        id="few-shot",
        description=("Minerva's MATH few-shot format for the base model: solved examples, "
                     "then Problem:\\n{question}\\n\\nSolution:"),
        # DeepSeek's evaluation stops the base model at EOS and at "\nProblem:", where it
        # would start inventing the next exemplar.
        stop=(EOS, "\nProblem:"),
        stop_reason="as DeepSeek's evaluation: EOS, and '\\nProblem:' (the next exemplar)",
    ),
}


def check_prompt_spec(spec: PromptSpec) -> None:
    """Raise RecipeError when a prompt spec names something this module cannot render."""
    if spec.template not in PROMPT_FORMATS:
        raise RecipeError(f"[prompt.template] unknown prompt format {spec.template!r}",
                          f"use one of {', '.join(PROMPT_FORMATS)}", field="prompt.template")
    if spec.cot_suffix not in COT_SUFFIXES:
        raise RecipeError(f"[prompt.cot_suffix] unknown suffix {spec.cot_suffix!r}",
                          f"use one of {', '.join(COT_SUFFIXES)}", field="prompt.cot_suffix")
    if spec.system_prompt not in SYSTEM_PROMPT_POLICIES:
        raise RecipeError(f"[prompt.system_prompt] unknown policy {spec.system_prompt!r}",
                          "use none or allow", field="prompt.system_prompt")
    if spec.template == "few-shot":
        if not 1 <= spec.few_shot <= len(MINERVA_MATH_EXEMPLARS):
            raise RecipeError(
                f"[prompt.few_shot] the few-shot format has {len(MINERVA_MATH_EXEMPLARS)} "
                f"MATH exemplars; {spec.few_shot} asked", "use 1 to 4 (DeepSeek uses 4)",
                field="prompt.few_shot")
        if spec.system_prompt == "allow":
            raise RecipeError("[prompt.system_prompt] the few-shot format has no place for a "
                              "system prompt", 'set system_prompt = "none"',
                              field="prompt.system_prompt")


def user_suffix(spec: PromptSpec) -> str:
    """The text appended to every user turn: the CoT suffix if the recipe asks for it."""
    return COT_SUFFIXES[spec.cot_suffix] if spec.append_cot_suffix else ""


def stop_strings(spec: PromptSpec) -> tuple[str, ...]:
    """Where generation must stop for this format (before any recipe extras)."""
    return PROMPT_FORMATS[spec.template].stop


def rendered_roles(spec: PromptSpec) -> tuple[str, ...]:
    """Roles the format renders; messages of other roles are invisible to it."""
    if spec.template == "deepseek-chat" and spec.system_prompt == "allow":
        return ROLES
    return ("user", "assistant")


def exemplar_block(ex: Exemplar) -> str:
    """One solved exemplar in Minerva's layout."""
    return (f"Problem:\n{ex.problem}\n\nSolution:\n{ex.solution}\n"
            f"Final Answer: The final answer is ${ex.answer}$. I hope it is correct.")


def few_shot_preamble(n: int) -> str:
    """The first ``n`` exemplars, separated by blank lines (DeepSeek's few_shot_prompt)."""
    return "\n\n".join(exemplar_block(ex) for ex in MINERVA_MATH_EXEMPLARS[:n])


def render_chat(spec: PromptSpec, messages: Sequence[ChatMessage]) -> str:
    """The exact prompt text (without BOS) for a conversation.

    Ending on a user turn, the text ends with the cue for a new reply (``Assistant:`` or
    ``Solution:``); ending on an assistant turn, it ends with that reply's text, unclosed,
    so the model continues it (Ollama's and Hugging Face's ``continue_final_message``
    rule). Messages whose role the format does not render are skipped entirely.
    """
    check_prompt_spec(spec)
    suffix = user_suffix(spec)
    visible = [m for m in messages if m.role in rendered_roles(spec)]
    out: list[str] = []
    if spec.template == "few-shot":
        out.append(few_shot_preamble(spec.few_shot))
        for m in visible:
            if m.role == "user":
                out.append(f"\n\nProblem:\n{m.content}{suffix}\n\nSolution:")
            else:
                out.append(f"\n{m.content}")
        return "".join(out)
    prev = ""
    for m in visible:
        if prev == "assistant":
            out.append(EOS)
        if m.role == "user":
            out.append(f"User: {m.content}{suffix}\n\n")
        elif m.role == "assistant":
            out.append(f"Assistant: {m.content}")
        else:
            out.append(f"{m.content}\n\n")
        prev = m.role
    if prev != "assistant":
        out.append("Assistant:")
    return "".join(out)


def render_prompt(spec: PromptSpec, question: str) -> str:
    """The prompt (without BOS) for one question, as DeepSeek's evaluation builds it.

    The question is used as given; DeepSeek's scripts strip it first, so pass stripped
    text (MATH problems have no surrounding whitespace).
    """
    return render_chat(spec, [ChatMessage("user", question)])
