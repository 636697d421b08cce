"""The model card (README.md) of a Hugging Face export (``maskscale export --format hf``).

Why a card: a directory on the Hub or a shared disk outlives the run directory it came from.
The card keeps what makes its numbers comparable (objective, tokens, FLOPs as ``6 N D``, the
corpus manifest's sha256, the tokenizer's) and the losses ``maskscale eval ppl`` measured for
this very checkpoint, and says how to load it, and for an MDM how to score and sample it with
maskscale (transformers has no masked-diffusion sampler).
"""

from __future__ import annotations


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "unknown"
    return format(value, spec) if spec else str(value)


def _losses(ppl: dict | None) -> list[str]:
    if not ppl:
        return [
            "No `maskscale eval ppl` result for this checkpoint was found in the run directory "
            "when it was exported (run `maskscale eval ppl RUN_DIR` and export again to add it).",
        ]
    estimator = ppl.get("estimator", "")
    lines = [
        f"`maskscale eval ppl` at step {ppl.get('step')} ({estimator}; nats per token, 95% "
        "bootstrap interval over documents where there were enough):",
        "",
        "| split | loss | interval | perplexity | tokens | documents |",
        "|---|---|---|---|---|---|",
    ]
    for split, r in ppl["splits"].items():
        ci = r.get("loss_ci")
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "none"
        lines.append(
            f"| {split} | {r['loss']:.4f} | {interval} | {r['ppl']:.4g} | {r.get('tokens')} "
            f"| {r.get('documents')} |"
        )
    return lines


def _usage_arm(name: str) -> list[str]:
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'ids = tok("The year", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))",
        "```",
        "",
        f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={name} --tasks ...`.",
    ]


def _usage_mdm(name: str, mask_id: int) -> list[str]:
    return [
        "A masked diffusion model: attention sees the whole sequence, and the model predicts",
        f"the tokens at positions holding the mask token (id {mask_id}, `config.mask_token_id`;",
        "it has an embedding row but no output row). Loading needs the modelling file in this",
        "directory:",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModel.from_pretrained("{name}", trust_remote_code=True)',
        'ids = tok("The year", return_tensors="pt").input_ids',
        f"ids[0, -1] = {mask_id}  # mask the last token",
        "logits = model(ids).logits  # [batch, length, vocab]: predictions for every position",
        "```",
        "",
        "To score and sample it with maskscale, convert it back to a maskscale export, then use",
        "the evaluation commands (the ELBO with the trained `mdm_eps`, the samplers, lm-eval):",
        "",
        "```bash",
        f'python -c \'from trainer.hf import hf_to_export; hf_to_export("{name}", "{name}-ms")\'',
        f"maskscale eval ppl {name}-ms --corpus CORPUS_DIR      # per-split loss (ELBO) and ppl",
        f"maskscale eval gen {name}-ms --prompts prompts.jsonl --steps 16,32,64",
        f"maskscale eval harness {name}-ms --tasks ...",
        "```",
        "",
        f"or continue training it: `maskscale train init=hf:{name} objective=mdm ...`.",
    ]


def render_card(
    prov: dict, model: dict, mdm: bool, eos: str | None, ppl: dict | None, name: str
) -> str:
    """The card's markdown; ``prov``: trainer.hf._provenance, ``model``: the ModelConfig dict."""
    family = "masked diffusion (MDM)" if mdm else "autoregressive (ARM)"
    flops = prov.get("flops")
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'fill-mask' if mdm else 'text-generation'}",
        "tags: [maskscale, llama" + (", masked-diffusion" if mdm else "") + "]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {family} language model trained with maskscale "
        f"(preset {_fmt(prov.get('preset'))}, objective `{prov.get('objective')}`).",
        "",
        "## Training",
        "",
        f"- Step: {_fmt(prov.get('step'))}; tokens: {_fmt(prov.get('tokens'), ',')}",
        f"- Non-embedding parameters N: {_fmt(prov.get('n_params'), ',')}",
        f"- Training FLOPs (6 N D): {_fmt(flops, '.4g')}",
        f"- Corpus: `{_fmt(prov.get('corpus'))}`",
        f"- Corpus manifest sha256: `{_fmt(prov.get('corpus_manifest_sha256'))}`",
        f"- Tokenizer sha256: `{_fmt(prov.get('tokenizer_sha256'))}`; EOS `{_fmt(eos)}`",
    ]
    if mdm:
        lines.append(f"- Mask probability floor (mdm.eps): {_fmt(prov.get('mdm_eps'))}")
    lines += [
        f"- Shape: {model['n_layer']} layers, {model['n_head']} heads, d_model "
        f"{model['d_model']}, vocab {model['vocab_size']}, context {model['seq_len']}",
        "",
        "## Validation and holdout losses",
        "",
        *_losses(ppl),
        "",
        "## Use",
        "",
        *(_usage_mdm(name, model["vocab_size"]) if mdm else _usage_arm(name)),
        "",
    ]
    return "\n".join(lines)
