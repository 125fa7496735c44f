"""A mixture-of-experts testbed whose routing is real, and the expert metrics compared on it.

No real MoE model can be fetched offline, and a randomly initialised router proves nothing about which expert
metric is right. So this script trains one, from a fixed seed, on the bundled training text (C4 documents
0-1199 and the Dolly records not reserved for evaluation): a Qwen3-MoE model (the architecture of
Qwen3-30B-A3B: softmax router, top-k, renormalised top-k weights) with 4 decoder layers, 16 experts per layer,
top-2, hidden size 192, and its own 4,096-token byte-level BPE vocabulary (a 49k vocabulary would make the
output layer most of the compute). Then:

1. **Do the experts specialise?** Per layer, on the held-out C4 slice: the mean entropy of the router's
   distribution (uniform over 16 experts = 2.77 nats), each expert's share of the routed tokens (uniform under
   top-2 of 16 = 12.5%), and how far the shares move between C4 and WikiText-2 (total variation).
2. **Which expert metric keeps the model?** Every built-in expert metric (random with three seeds: the floor)
   removes 25% and 50% of the experts of every layer (layerprune's selection and removal, the default
   calibration text); held-out perplexity on C4 documents 1200-1499 and WikiText-2 — before and after a short
   heal with layerprune's default healing (distillation from the unpruned testbed).
3. **Depth pruning at the same parameter count** beside them: 1 and 2 of the 4 layers removed by the default
   layer metric (slightly more parameters go than with 25% / 50% of the experts: attention too).

The trained testbed is kept in --workdir and reused when its recipe is unchanged.

    python bench/moe_testbed.py [--workdir /tmp/layerprune-moe-testbed] [--steps 1500] [--heal-steps 40]

Results: --workdir/results.json and a markdown table on stdout (docs/results.md "Expert pruning on a trained
MoE testbed"). Times name the CPU.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _common import cpu_kind  # noqa: E402  (bench/ is on sys.path when run as a script)

ARCHITECTURE = {  # Qwen3MoeConfig fields
    "vocab_size": 4096, "hidden_size": 192, "moe_intermediate_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
    "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "max_position_embeddings": 512, "tie_word_embeddings": True, "router_aux_loss_coef": 0.0,  # see BALANCE
}
# The load-balancing loss of Switch Transformers (arXiv 2101.03961) in every MoE layer, averaged over the layers,
# as Mixtral and Qwen3-MoE were trained. transformers' own auxiliary loss pools the router logits of all layers
# before it counts, so one layer may let experts die while another overuses them: trained with it, some
# experts of every layer received no held-out token, and every metric found those first.
TRAINING = {"seq_len": 256, "batch_size": 16, "learning_rate": 1.5e-3, "warmup": 100, "weight_decay": 0.1, "seed": 0,
            "balance": 0.01}
RECIPE = {**ARCHITECTURE, **TRAINING}
EVAL_WINDOWS = 48  # held-out windows of 256 tokens per text (12k tokens)


# ------------------------------------------------------------------------------------------- training text
def training_texts() -> list[str]:
    from layerprune.data.instructions import dolly_records, dolly_split
    from layerprune.data.sources import read_texts

    dolly, _reserved = dolly_split(dolly_records())
    rows = [" ".join(x for x in (r["instruction"], r.get("context", ""), r["response"]) if x) for r in dolly]
    return read_texts("c4") + rows


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ training
def build_testbed(folder: Path, steps: int) -> dict:
    """Train the testbed into `folder` (or reuse it when the recipe and step count match)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    key = hashlib.sha256(json.dumps({**RECIPE, "steps": steps}, sort_keys=True).encode()).hexdigest()[:16]
    record_path = folder / "testbed.json"
    if record_path.is_file() and json.loads(record_path.read_text()).get("key") == key:
        return json.loads(record_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(RECIPE["seed"])
    texts = training_texts()
    tokenizer = train_tokenizer(texts, RECIPE["vocab_size"], folder)
    stream = token_stream(tokenizer, texts)
    config = Qwen3MoeConfig(**ARCHITECTURE,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = Qwen3MoeForCausalLM(config)
    model.config._experts_implementation = "grouped_mm"  # training only: the saved config keeps the default
    curve, seconds = train(model, stream, steps)
    model.config._experts_implementation = "eager"
    model.config.output_router_logits = False
    model.save_pretrained(folder)
    record = {"key": key, "recipe": RECIPE, "steps": steps, "train_tokens": int(stream.numel()),
              "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
              "loss_curve": curve, "cpu": cpu_kind()}
    record_path.write_text(json.dumps(record, indent=1))
    assert model.config.num_experts == ARCHITECTURE["num_experts"], "the config did not take the expert count"
    return record


def train(model, stream: torch.Tensor, steps: int) -> tuple[list, float]:
    from layerprune.hardware.compute import compute_choice

    seq, batch = RECIPE["seq_len"], RECIPE["batch_size"]
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["weight_decay"]},
                                   {"params": other, "weight_decay": 0.0}], lr=RECIPE["learning_rate"],
                                  betas=(0.9, 0.95))
    warmup = RECIPE["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    choice = compute_choice("cpu")
    model.train()
    curve, start = [], time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=generator)
        ids = torch.stack([stream[s: s + seq] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=choice.mixed):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        balance = balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (out.loss + RECIPE["balance"] * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            curve.append([step, round(float(out.loss), 4)])
            left = elapsed / (step + 1) * (steps - step - 1)
            print(f"  step {step}/{steps} loss {float(out.loss):.3f} (balance {float(balance):.3f}) "
                  f"{elapsed / 60:.1f} min, ~{left / 60:.1f} min left", flush=True)
    model.eval()
    return curve, time.perf_counter() - start


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Mean over the MoE layers of E * sum_i f_i * P_i (f_i: the share of the layer's top-k picks that go to
    expert i, P_i: its mean router probability): 1 when the layer's experts are used evenly."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        picks = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, -1).indices, 1.0)
        losses.append(probs.shape[-1] * (picks.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------- specialisation
@torch.no_grad()
def routing_profile(model, tokenizer, source: str) -> list[dict]:
    """Per MoE layer: mean router entropy (nats) and each expert's share of the top-k hits on `source`."""
    from layerprune.evaluation.perplexity import load_ppl_text

    ids = tokenizer(load_ppl_text(source).text[:400_000], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[0, : (ids.numel() // 256) * 256].view(-1, 256)[:EVAL_WINDOWS]
    out = model(input_ids=ids, output_router_logits=True)
    top_k, profile = model.config.num_experts_per_tok, []
    for logits in out.router_logits:
        probs = logits.float().softmax(-1)
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        hits = torch.bincount(probs.topk(top_k, -1).indices.flatten(), minlength=probs.shape[-1]).float()
        profile.append({"entropy": round(entropy, 3), "share": (hits / hits.sum()).tolist()})
    return profile


def specialisation(model, tokenizer) -> list[dict]:
    c4, wiki = routing_profile(model, tokenizer, "c4-heldout"), routing_profile(model, tokenizer, "wikitext2")
    rows = []
    for layer, (a, b) in enumerate(zip(c4, wiki)):
        shift = 0.5 * sum(abs(x - y) for x, y in zip(a["share"], b["share"]))
        rows.append({"layer": layer, "entropy_c4": a["entropy"], "share_min": round(min(a["share"]), 4),
                     "share_max": round(max(a["share"]), 4), "shift_c4_wikitext2": round(shift, 3)})
    return rows


# ------------------------------------------------------------------------------------------------ judging
def held_out(model, tokenizer) -> dict:
    from layerprune.evaluation.perplexity import load_ppl_text, perplexity

    return {source: round(perplexity(model, tokenizer, load_ppl_text(source).text, seq_len=256, batch_size=8,
                                     max_windows=EVAL_WINDOWS, progress=False)["ppl"], 2)
            for source in ("c4-heldout", "wikitext2")}


def healed(pruned_dir: Path, teacher: Path, steps: int, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    from layerprune.api import heal_model

    out = pruned_dir.with_name(pruned_dir.name + "-healed")
    heal_model(str(pruned_dir), out=str(out), teacher=str(teacher), max_steps=steps, overwrite=True,
               logging_steps=10)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return held_out(model, tokenizer)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def expert_rows(model, tokenizer, testbed: Path, work: Path, ratios, heal_steps: int) -> list[dict]:
    from layerprune.data.calibration import load_calibration
    from layerprune.importance.experts.registry import available_expert_metrics
    from layerprune.models.experts.surgery import remove_experts
    from layerprune.models.saving import save_model
    from layerprune.selection.config import CalibrationConfig
    from layerprune.selection.experts import choose_experts

    calibration_config = CalibrationConfig()
    calibration = load_calibration(tokenizer, calibration_config.source, n_samples=calibration_config.n_samples,
                                   seq_len=calibration_config.seq_len, seed=calibration_config.seed)
    arms = [(m, {}) for m in available_expert_metrics() if m != "random"]
    arms += [("random", {"seed": s}) for s in range(3)]
    rows = []
    for ratio in ratios:
        for metric, params in arms:
            name = metric + (f"-{params['seed']}" if params else "")
            start = time.perf_counter()
            drop, _how = choose_experts(model, calibration, metric=metric, ratio=ratio, params=params)
            pruned = remove_experts(copy.deepcopy(model), drop)
            row = {"what": "experts", "metric": name, "ratio": ratio, "parameters": count(pruned),
                   "drop": {str(k): v for k, v in drop.items()}, "select_seconds": round(time.perf_counter() - start, 1),
                   "ppl": held_out(pruned, tokenizer)}
            if heal_steps:
                folder = work / f"experts-{name}-{ratio}"
                save_model(pruned, tokenizer, folder, overwrite=True)
                row["healed_ppl"] = healed(folder, testbed, heal_steps, tokenizer)
            print(f"  experts {name} {ratio:.0%}: {row['ppl']} healed {row.get('healed_ppl')}", flush=True)
            rows.append(row)
    return rows


def depth_rows(tokenizer, testbed: Path, work: Path, layer_counts, heal_steps: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from layerprune.api import prune_model

    rows = []
    for k in layer_counts:
        folder = work / f"layers-{k}"
        result = prune_model(str(testbed), out=str(folder), num_layers=k, overwrite=True, dtype="float32")
        pruned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        row = {"what": "layers", "metric": result.chosen_by, "layers_removed": k, "drop": result.dropped,
               "parameters": count(pruned),
               "ppl": held_out(pruned, tokenizer)}
        if heal_steps:
            row["healed_ppl"] = healed(folder, testbed, heal_steps, tokenizer)
        print(f"  layers {k}: {row['ppl']} healed {row.get('healed_ppl')}", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    base = results["unpruned"]
    lines = ["| removed | chosen by | parameters | C4 held-out | WikiText-2 | healed C4 | healed WikiText-2 |",
             "|---|---|---|---|---|---|---|",
             f"| nothing | - | {base['parameters'] / 1e6:.2f}M | {base['ppl']['c4-heldout']} | "
             f"{base['ppl']['wikitext2']} | - | - |"]
    for row in results["rows"]:
        what = f"{row['ratio']:.0%} of experts" if row["what"] == "experts" else f"{row['layers_removed']} of 4 layers"
        healed_ppl = row.get("healed_ppl") or {}
        lines.append(f"| {what} | {row['metric']} | {row['parameters'] / 1e6:.2f}M | {row['ppl']['c4-heldout']} | "
                     f"{row['ppl']['wikitext2']} | {healed_ppl.get('c4-heldout', '-')} | "
                     f"{healed_ppl.get('wikitext2', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/layerprune-moe-testbed")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of 16 x 256 tokens")
    parser.add_argument("--heal-steps", type=int, default=40, help="0: no healing column")
    parser.add_argument("--ratios", default="0.25,0.5")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.workdir)
    testbed = work / "testbed"
    print(f"testbed: {testbed} ({cpu_kind()})", flush=True)
    record = build_testbed(testbed, args.steps)
    print(f"trained {record['steps']} steps in {record['train_seconds'] / 60:.1f} min; final loss "
          f"{record['loss_curve'][-1][1]}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(testbed)
    model = AutoModelForCausalLM.from_pretrained(testbed, dtype=torch.float32).eval()
    results = {"testbed": {k: v for k, v in record.items() if k != "loss_curve"}, "cpu": cpu_kind(),
               "heal_steps": args.heal_steps, "specialisation": specialisation(model, tokenizer),
               "unpruned": {"parameters": count(model), "ppl": held_out(model, tokenizer)}}
    print(json.dumps(results["specialisation"], indent=1), flush=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    start = time.perf_counter()
    results["rows"] = expert_rows(model, tokenizer, testbed, work, ratios, args.heal_steps)
    results["rows"] += depth_rows(tokenizer, testbed, work, [round(r * 4) for r in ratios], args.heal_steps)
    results["compare_seconds"] = round(time.perf_counter() - start, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
