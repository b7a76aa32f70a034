"""Train mathq's tiny demo model and write it to models/tiny-demo in Hugging Face layout.

The demo model lets the whole pipeline run offline on a model that really solves something:
a small LLaMA (DeepSeek-Math's shape conventions scaled down) that answers simple arithmetic
word problems in DeepSeek's chat format with a short chain of thought and a boxed answer.

Everything here is deterministic (fixed seeds, fixed thread count) and written without
pickle: weights with the ``safetensors`` package, the rest as JSON. The model is plain torch
written to match Hugging Face's ``LlamaForCausalLM`` exactly (tensor names, rotate-half RoPE,
RMSNorm, SwiGLU), so mathq's converter treats it like the real checkpoint.

Needs the ``train`` extra (CPU torch, tokenizers, safetensors)::

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python scripts/train_tiny_demo.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, trainers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_demo_data as data

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "deepseek-llm-tokenizer"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class ModelShape:
    """The LLaMA hyperparameters; hidden and FFN sizes are multiples of 256 so that
    llama.cpp's k-quants (256-wide super-blocks) apply to every matrix."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    vocab_size: int = 768  # tokenizer size rounded up to 128: padding rows, like DeepSeek's
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainSettings:
    """Training hyperparameters and seeds."""

    bpe_vocab: int = 960
    tokenizer_texts: int = 10_000
    steps: int = 1200
    batch_size: int = 16   # word problems per step
    drill_batch: int = 32  # drill sheets per step
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 1234
    drill_seed: int = data.DRILL_SEED
    threads: int = 1  # on a shared 2-core box, 2 threads ran 2-4x slower than 1 (spinning)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: list[str], bpe_vocab: int) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` with DeepSeek's pre-tokenizer.

    DeepSeek splits digits one by one because its vocabulary has no multi-digit token; its
    pre-tokenizer only isolates digit runs. So the BPE is trained with runs cut into single
    digits, and the finished tokenizer gets DeepSeek's pre-tokenizer back unchanged (copied
    as JSON structure, never as text, to keep its NFC-unstable code points intact).
    """
    fixture = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    deepseek_pre = fixture["pre_tokenizer"]
    training_pre = copy.deepcopy(deepseek_pre)
    digit_splits = [p for p in training_pre["pretokenizers"]
                    if p.get("pattern") == {"Regex": "\\p{N}+"}]
    if len(digit_splits) != 1:
        raise SystemExit("the fixture's pre-tokenizer has no \\p{N}+ split; cannot train")
    digit_splits[0]["pattern"] = {"Regex": "\\p{N}"}

    skeleton = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": fixture["normalizer"], "pre_tokenizer": training_pre,
        "post_processor": None, "decoder": fixture["decoder"],
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": {}, "merges": []},
    }
    tok = Tokenizer.from_str(json.dumps(skeleton))
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=_byte_alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(data.BOS, special=True, normalized=False),
                            AddedToken(data.EOS, special=True, normalized=False)])

    final = json.loads(tok.to_str())
    final["pre_tokenizer"] = deepseek_pre
    final["decoder"] = fixture["decoder"]
    post = copy.deepcopy(fixture["post_processor"])
    post["special_tokens"][data.BOS]["ids"] = [tok.token_to_id(data.BOS)]
    final["post_processor"] = post
    return Tokenizer.from_str(json.dumps(final))


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json: DeepSeek's, with its chat template copied from the fixture."""
    fixture = json.loads((FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"))
    keys = ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "pad_token",
            "clean_up_tokenization_spaces", "legacy", "tokenizer_class", "chat_template")
    out = {k: fixture[k] for k in keys}
    out["model_max_length"] = ModelShape.max_position_embeddings
    return out


Example = tuple[list[int], list[int]]  # token ids, and 1 where the next-token loss counts


def encode_examples(tok: Tokenizer, problems: list[data.Problem]) -> list[Example]:
    """Prompt + reply token ids, with the loss on the reply (and its EOS) only.

    The prompt's tokens must be a prefix of the whole example's, or the model would be
    trained on a token boundary it never sees when generating after "Assistant:".
    """
    prompts = [data.prompt_text(p.problem) for p in problems]
    fulls = [t + data.reply_text(p.solution) for t, p in zip(prompts, problems, strict=True)]
    out = []
    for p, prompt, full in zip(problems, tok.encode_batch(prompts, add_special_tokens=False),
                               tok.encode_batch(fulls, add_special_tokens=False), strict=True):
        if full.ids[:len(prompt.ids)] != prompt.ids:
            raise SystemExit(f"prompt tokens are not a prefix of the example: {p.problem!r}")
        n = len(prompt.ids)
        out.append((full.ids, [0] * n + [1] * (len(full.ids) - n)))
    return out


def encode_drills(tok: Tokenizer, sheets: list[list[tuple[str, str]]]) -> list[Example]:
    """BOS + equation lines, with the loss on each right-hand side (result, ".", newline)."""
    bos = tok.token_to_id(data.BOS)
    pieces = sorted({x for sheet in sheets for lhs, rhs in sheet for x in (lhs, rhs + "\n")})
    ids_of = dict(zip(pieces, (e.ids for e in tok.encode_batch(
        pieces, add_special_tokens=False)), strict=True))
    out = []
    for sheet in sheets:
        ids, mask = [bos], [0]
        for lhs, rhs in sheet:
            ids += ids_of[lhs] + ids_of[rhs + "\n"]
            mask += [0] * len(ids_of[lhs]) + [1] * len(ids_of[rhs + "\n"])
        out.append((ids, mask))
    # Pieces must tokenize as the whole text does, or the drills teach other token boundaries.
    for sheet, (ids, _) in zip(sheets[:100], out, strict=False):
        text = data.BOS + "".join(lhs + rhs + "\n" for lhs, rhs in sheet)
        if tok.encode(text, add_special_tokens=False).ids != ids:
            raise SystemExit(f"drill pieces tokenize differently from the sheet: {text!r}")
    return out


# --------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(shape: ModelShape, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for Hugging Face's rotate-half RoPE (frequencies repeated, not interleaved)."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.heads, self.head_dim = s.num_attention_heads, s.hidden_size // s.num_attention_heads
        self.q_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)
        self.o_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Hugging Face's LlamaForCausalLM, reduced to what the demo needs; same parameter names."""

    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.shape = s
        self.model = Backbone(s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * s.num_hidden_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor, start: int = 0, caches=None) -> torch.Tensor:
        cos, sin = rope_tables(self.shape, torch.arange(start, start + ids.shape[1]))
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.lm_head(self.model.norm(x))


# --------------------------------------------------------------------------- training


def make_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (-100, ignored, where the mask is 0)."""
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        seq, keep = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        inputs[row, :len(ids) - 1] = seq[:-1]
        targets[row, :len(ids) - 1] = torch.where(keep[1:], seq[1:], -100)
    return inputs, targets


def train(model: LlamaForCausalLM, examples: list[Example], drills: list[Example], pad_id: int,
          cfg: TrainSettings, check=None) -> list[float]:
    """AdamW with warm-up and cosine decay over batches of word problems plus drill sheets.

    Prints progress; returns the mean loss of every 25 steps.
    """
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    streams = [_Stream(examples, cfg.batch_size, gen), _Stream(drills, cfg.drill_batch, gen)]
    history, running, t0 = [], 0.0, time.time()
    model.train()
    for step in range(cfg.steps):
        inputs, targets = make_batch([x for s in streams for x in s.take()], pad_id)
        logits = model(inputs)  # fp32: bf16 autocast hits AMX kernels this VM traps on
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 25 == 0:
            history.append(running / 25)
            print(f"step {step + 1:5d}/{cfg.steps}  loss {running / 25:.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s", flush=True)
            running = 0.0
        if check is not None and (step + 1) % 200 == 0 and step + 1 < cfg.steps:
            print(f"  {check(model)}", flush=True)
            model.train()
    return history


class _Stream:
    """Endless shuffled batches of one kind of example, reshuffled every epoch."""

    def __init__(self, items: list[Example], size: int, gen: torch.Generator) -> None:
        self.items, self.size, self.gen = items, size, gen
        self.order: list[int] = []

    def take(self) -> list[Example]:
        if len(self.order) < self.size:
            self.order = torch.randperm(len(self.items), generator=self.gen).tolist()
        batch, self.order = self.order[:self.size], self.order[self.size:]
        return [self.items[i] for i in batch]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model: LlamaForCausalLM, prompt: list[int], eos_id: int, max_new: int) -> list[int]:
    """Greedy decoding with a key/value cache, stopping at EOS."""
    caches = [[] for _ in model.model.layers]
    logits = model(torch.tensor([prompt]), 0, caches)
    out: list[int] = []
    pos = len(prompt)
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        if nxt == eos_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), pos, caches)
        pos += 1
    return out


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} in ``text``."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def evaluate(model: LlamaForCausalLM, tok: Tokenizer, problems: list[data.Problem],
             eos_id: int) -> tuple[float, dict[str, tuple[int, int]]]:
    """Exact boxed-answer accuracy (percent) and (correct, total) per problem kind."""
    model.eval()
    per_kind: dict[str, list[int]] = {}
    for p in problems:
        prompt = tok.encode(data.prompt_text(p.problem), add_special_tokens=False).ids
        reply = tok.decode(greedy(model, prompt, eos_id, 64), skip_special_tokens=False)
        ok = boxed_answer(reply) == p.answer
        per_kind.setdefault(p.kind, [0, 0])
        per_kind[p.kind][0] += ok
        per_kind[p.kind][1] += 1
    correct = sum(c for c, _ in per_kind.values())
    return 100.0 * correct / len(problems), {k: (c, n) for k, (c, n) in per_kind.items()}


# --------------------------------------------------------------------------- writing


def hf_config(s: ModelShape, bos_id: int, eos_id: int) -> dict[str, object]:
    """config.json as DeepSeek-Math 7B's, scaled down."""
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "hidden_act": "silu",
        "hidden_size": s.hidden_size, "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings, "model_type": "llama",
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_attention_heads, "pretraining_tp": 1,
        "rms_norm_eps": s.rms_norm_eps, "rope_scaling": None, "rope_theta": s.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": s.vocab_size,
    }


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-demo",
                    help="folder to write the checkpoint into")
    ap.add_argument("--steps", type=int, default=TrainSettings.steps, help="training steps")
    ap.add_argument("--threads", type=int, default=TrainSettings.threads,
                    help="torch threads (1 is faster when other jobs share the cores)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue from a checkpoint this script wrote (its tokenizer and bf16 "
                         "weights; fresh optimizer): a second training stage")
    ap.add_argument("--lr", type=float, default=TrainSettings.lr, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=TrainSettings.warmup, help="warm-up steps")
    ap.add_argument("--seed", type=int, default=TrainSettings.seed,
                    help="seed for initialisation and batch order")
    ap.add_argument("--batch-size", type=int, default=TrainSettings.batch_size,
                    help="word problems per step")
    ap.add_argument("--drill-batch", type=int, default=TrainSettings.drill_batch,
                    help="drill sheets per step")
    ap.add_argument("--drill-seed", type=int, default=TrainSettings.drill_seed,
                    help="seed of the drill sheets (give a second stage new ones)")
    args = ap.parse_args(argv)
    cfg = TrainSettings(steps=args.steps, threads=args.threads, lr=args.lr,
                        warmup=args.warmup, seed=args.seed, drill_seed=args.drill_seed,
                        batch_size=args.batch_size, drill_batch=args.drill_batch)
    shape = ModelShape()
    previous = None
    if args.init_from is not None:  # read everything first: --out may be the same folder
        previous = json.loads((args.init_from / "training.json").read_text(encoding="utf-8"))
        init_tok = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
        init_state = load_file(str(args.init_from / "model.safetensors"))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t_start = time.time()

    heldout = data.heldout_problems()
    train_set = list(data.training_problems(data.TRAIN_SIZE, {p.problem for p in heldout}))
    texts = [data.prompt_text(p.problem) + data.reply_text(p.solution) for p in train_set]
    tok = init_tok if previous else build_tokenizer(texts[:cfg.tokenizer_texts], cfg.bpe_vocab)
    bos_id, eos_id = tok.token_to_id(data.BOS), tok.token_to_id(data.EOS)
    shape = replace(shape, vocab_size=-(-tok.get_vocab_size() // 128) * 128)
    examples = encode_examples(tok, train_set)
    drills = encode_drills(tok, list(data.drill_sheets(cfg.steps * cfg.drill_batch,
                                                    seed=cfg.drill_seed)))
    lengths = sorted(len(ids) for ids, _ in examples)
    print(f"{len(train_set)} training problems, {len(drills)} drill sheets, "
          f"{len(heldout)} held out; vocab "
          f"{tok.get_vocab_size()} (+{shape.vocab_size - tok.get_vocab_size()} padding rows); "
          f"tokens per example median {lengths[len(lengths) // 2]}, max {lengths[-1]}",
          flush=True)

    model = LlamaForCausalLM(shape)
    if previous:
        model.load_state_dict({k: v.float() for k, v in init_state.items()})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    def check(m: LlamaForCausalLM) -> str:
        acc, kinds = evaluate(m, tok, heldout[:40], eos_id)
        return f"held-out accuracy on 40 (fp32 weights): {acc:.1f}%  {kinds}"

    history = train(model, examples, drills, eos_id, cfg, check)
    train_s = time.time() - t_start

    # Round to bf16, as committed, and evaluate that.
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    acc, per_kind = evaluate(model, tok, heldout, eos_id)
    train_acc, _ = evaluate(model, tok, train_set[:50], eos_id)
    print(f"held-out accuracy (bf16 weights, greedy): {acc:.1f}%  {per_kind}", flush=True)
    print(f"training-set accuracy (first 50): {train_acc:.1f}%", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", hf_config(shape, bos_id, eos_id))
    write_json(out / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False})
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config())
    data.write_problem_set(out / "problems.jsonl", heldout)
    write_json(out / "training.json", {
        "shape": asdict(shape), "settings": asdict(cfg), "parameters": n_params,
        "loss_every_25_steps": [round(x, 4) for x in history],
        "heldout_accuracy_bf16": acc,
        "heldout_by_kind": {k: list(v) for k, v in sorted(per_kind.items())},
        "train_accuracy_first_50": train_acc,
        "train_seconds": round(train_s), "torch": torch.__version__,
        "previous_stage": previous,
    })
    print(f"wrote {out} in {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
